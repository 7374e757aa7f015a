# cantobot: python slim + libopus (voice decode) + libsndfile (audio files).
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopus0 libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
RUN pip install --no-cache-dir .
# Token and key come from the environment (DISCORD_TOKEN, CANTONESE_AI_API_KEY).
VOLUME /data
ENV CANTOBOT_LOG_LEVEL=INFO
# Mount a config with -v ./config.yaml:/app/config.yaml and add `--config /app/config.yaml`.
ENV CANTOBOT_STORAGE_PATH=/data/cantobot.sqlite3
CMD ["cantobot", "run"]
