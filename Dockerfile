# Build from the repository root (the ride schema is shared with training):
#   docker build -f backend/Dockerfile -t ridestream-backend .
# Credentials are never baked in: on Cloud Run the service account's identity (ADC) is used.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=8080 \
    WEB_CONCURRENCY=1

RUN useradd --create-home --uid 10001 app
WORKDIR /app

COPY backend/requirements.txt backend/requirements.txt
RUN pip install -r backend/requirements.txt

COPY training/__init__.py training/ride.py training/
COPY backend/ backend/

USER app
EXPOSE 8080
# gunicorn reads its worker count from WEB_CONCURRENCY. Keep 1 with the in-memory result store;
# with REDIS_URL set, workers and replicas share results and one pull subscription, so scale freely.
CMD ["sh", "-c", "exec gunicorn --bind 0.0.0.0:${PORT} --threads 16 --timeout 60 --access-logfile - 'backend.app:create_app()'"]
