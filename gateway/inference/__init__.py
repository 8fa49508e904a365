"""The inference flow behind the OpenAI routes; the controllers only parse and respond.

- `admission`: the allowed set for (principal, purpose, now) and the caller's narrowing;
- `params`: OpenAI parameters checked and mapped to engine SamplingParams (400 naming each);
- `prompts`: prompts (text, token ids, chat messages) to checked token ids;
- `run`: one request's engine streams, results, logprobs;
- `records`: its ledger records (started, inference, aborted), awaited durable;
- `streaming`: Server-Sent Events in OpenAI's chunk format.
"""
