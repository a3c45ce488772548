"""embedserve gateway: embeddings and vector search over verified model versions."""
