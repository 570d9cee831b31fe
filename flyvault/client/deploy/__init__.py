"""Deploy plans applied inside a vault: ``load_plan`` (checked before connecting) and the
``Engine`` (apply, status, reverse over ``flyvault.client.Vault``). See
references/deploy-plans.md."""

from flyvault.client.deploy.plan import Plan, load_plan, parse_plan

__all__ = ["Plan", "load_plan", "parse_plan"]
