"""What the tests, the benches and the laptop demo share: a local cluster of real processes
(``cluster``, and ``lmcache`` for the comparison), the one OpenAI client (``openai_client``),
the bundled document (``documents``), the demo model (``demo_model``) and the reused-KV
correctness cases (``correctness``). Nothing in the connector, directory or transport
imports it."""
