"""Moved to ddpm_fast.tools.traffic; this alias (and `python -m ddpm_fast.traffic`) stays for one release."""

from ddpm_fast.tools._alias import alias

alias(__name__, "ddpm_fast.tools.traffic")
