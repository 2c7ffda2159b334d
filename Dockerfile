FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COHORT_DATA_DIR=/var/lib/cohort
WORKDIR /srv/cohort

COPY pyproject.toml README.md alembic.ini ./
COPY app app
COPY workers workers
COPY migrations migrations
RUN pip install -e . \
    && useradd --system --home-dir /var/lib/cohort --create-home cohort

USER cohort
EXPOSE 8000
CMD ["cohort", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
