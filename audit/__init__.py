"""The tamper-evident audit ledger and the project's database layer (docs/audit.md).

Modules, each with one job:

- `db`: engines, the shared declarative `Base`, schema checks, Alembic upgrade/downgrade;
- `models`: the ledger's tables; `jcs`: RFC 8785 canonical JSON; `canonical`: record
  hashes of format v1; `format`: checkpoints as a verifier elsewhere reads them;
- `ledger`: `append` / `append_many` inside a caller's transaction;
- `writer`: `LedgerWriter`, group commit for callers without a transaction;
- `inference`: the payload of an `inference` record;
- `merkle`: RFC 6962/9162 trees and proofs; `signing`: the Ed25519 checkpoint key;
- `checkpoints`: signed checkpoints, inclusion and consistency proofs; `anchor`: checkpoints
  kept outside the database (anchor file, witnesses) and the signer's readiness (`health()`);
- `verify`: streaming verification; `derived`: derived-state checks and their plugin hook;
  `query`: record pages, usage and the data owner's scope; `export`: JSONL/CSV exports;
  `offline`: their standalone verification (stdlib + cryptography); `cli`: `flexgate db …`
  and `flexgate audit …`.

Nothing here imports engine, governance or gateway.
"""
