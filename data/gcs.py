"""Cloud Storage addresses, one way. (The serving function keeps its own copy: its upload is self-contained.)"""

from __future__ import annotations


def split_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/key`` as ``("bucket", "some/key")``; the key is empty for a bare bucket."""
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri}")
    bucket, _, key = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri}")
    return bucket, key.strip("/")
