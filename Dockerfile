# CPU image of the Equipoise service. Build: docker build -t equipoise .
FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    EQUIPOISE_STATE_DIR=/var/lib/equipoise \
    EQUIPOISE_HOST=0.0.0.0

WORKDIR /app
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml README.md alembic.ini ./
COPY equipoise ./equipoise
COPY api ./api
COPY model ./model
COPY training ./training
COPY monitoring ./monitoring
COPY migrations ./migrations
RUN pip install ".[cpu]"

RUN useradd --system --uid 10001 --home-dir /var/lib/equipoise --create-home equipoise
USER equipoise
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["equipoise", "serve"]
