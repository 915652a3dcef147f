"""Certificate authority, tokens, CSR flow and SSH host certificates. Imports nothing of ``tunneld`` or ``proxy``."""
