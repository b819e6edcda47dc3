"""Child process of the durability test: ingest batches, print each acknowledged id, flush.

python -m tests.service.storage.ingest_child URL BANK N_DOCS BATCH
"""

from __future__ import annotations

import sys

from service.storage.redis_store import RedisMemoryStore
from tests.service.storage.helpers import doc, memory_for


def main(argv: list[str]) -> None:
    url, bank, n, batch = argv[0], argv[1], int(argv[2]), int(argv[3])
    store = RedisMemoryStore(url, bank=bank)
    for start in range(0, n, batch):
        items = [(doc(i), *memory_for(i)) for i in range(start, min(n, start + batch))]
        results = store.put_many(items, "v1")
        sys.stdout.write("".join(f"{r.id}\n" for r in results))  # acknowledged = put_many returned
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
