"""The gallery: SQL store (truth), FAISS index (derived), and the Gallery that keeps them in step."""
