"""The tamper-evident audit ledger and the project's database layer (docs/audit.md).

Modules, each with one job:

- `db`: engines, the shared declarative `Base`, schema checks, Alembic upgrade/downgrade;
- `models`: the ledger's tables; `canonical`: canonical JSON and record hashes;
- `ledger`: `append` / `append_many` inside a caller's transaction;
- `writer`: `LedgerWriter`, group commit for callers without a transaction;
- `inference`: the payload of an `inference` record;
- `merkle`: RFC 6962/9162 trees and proofs; `signing`: the Ed25519 checkpoint key;
- `checkpoints`: signed checkpoints, inclusion and consistency proofs;
- `verify`: streaming verification; `query`: record pages and usage; `export`: JSONL/CSV
  exports and their offline verification; `cli`: `flexgate db …` and `flexgate audit …`.

Nothing here imports engine, governance or gateway.
"""
