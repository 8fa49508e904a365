"""Governance: who may use which expert, for what, and when — decided per request.

What the gateway calls (each module holds one job; services take the session as a keyword
and run one transaction each: change + Casbin rule + policy-version bump + ledger record):

- authenticate: `auth.authenticate(session, authorization_header, jwt=JwtVerifier | None)`
  -> `identity.Identity` or `errors.AuthenticationFailed` (401);
  `oidc.OidcSettings.from_settings()` / `oidc.JwtVerifier(settings)` for optional JWT bearers.
- decide: one `store.PolicyStore()` per worker; per request
  `snap = await store.snapshot(session)` (one version read, reload only when it moved), then
  `snap.authorize(identity.roles, method, path)` (403 when False) and
  `snap.allowed_experts(identity, purpose, at=None, narrowing=None)` -> `(allowed, excluded)`;
  `snap.version` goes into the inference audit record.
- watch: `watcher.PolicyWatcher(sessionmaker, store).subscribe(cb)`; `async with watcher:`
  calls `cb(PolicyChange)` within ~250 ms of any committed change in any process
  (`change.current`, `change.withdrawn`); `experts.on_withdrawal(cb)` fires in-process.
- manage: `principals`, `keys`, `experts` (registry, owners, withdraw/reinstate) and
  `licenses` (grant, revoke, deny, lift); `experts.ensure_registered(...)` at start-up.
- errors: `errors.GovernanceError` subclasses carry a stable `code` for HTTP mapping.
- drift: `drift.check_policy_drift(engine)` replays the governance ledger records and reports
  every derived table (casbin_rule, principals, api_keys, experts, licenses, denials) that
  no longer matches them; `audit verify` runs it (entry point group
  `flexgate.derived_checks`).
"""
