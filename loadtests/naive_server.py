"""The naive reference server: one HTTP request = one ONNX Runtime inference, no batching, no cache.

What a first version of an embedding endpoint usually looks like; the benchmark runs it on the
same model.onnx to show what the gateway's batching is worth. Run: python -m loadtests.naive_server
with EMBEDSERVE_MODEL_REPOSITORY, EMBEDSERVE_HOST and EMBEDSERVE_PORT set.
"""

import base64
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from tokenizers import Tokenizer


class Request(BaseModel):
    input: str | list[str]
    model: str = "minilm"
    encoding_format: str = "float"


def create_naive_app(version_dir: Path) -> FastAPI:
    session = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(version_dir / "tokenizer.json"))
    tokenizer.enable_truncation(256)
    tokenizer.enable_padding()
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/embeddings")
    def embed(request: Request) -> dict[str, object]:
        texts = [request.input] if isinstance(request.input, str) else request.input
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        vectors = session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            for i, v in enumerate(vectors)
        ]
        return {"object": "list", "data": data, "model": request.model}

    return app


if __name__ == "__main__":
    repository = Path(os.environ.get("EMBEDSERVE_MODEL_REPOSITORY", "model_repository"))
    app = create_naive_app(repository / "minilm" / "1")
    uvicorn.run(
        app,
        host=os.environ.get("EMBEDSERVE_HOST", "127.0.0.1"),
        port=int(os.environ.get("EMBEDSERVE_PORT", "8001")),
        log_level="warning",
    )
