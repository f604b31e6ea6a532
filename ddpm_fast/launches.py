"""Moved to ddpm_fast.tools.launches; this alias (and `python -m ddpm_fast.launches`) stays for one release."""

from ddpm_fast.tools._alias import alias

alias(__name__, "ddpm_fast.tools.launches")
