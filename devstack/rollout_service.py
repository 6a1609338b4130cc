"""The rollout service on the local stack: ``rollout.app`` with the stack's function deployments as targets.

    STACK_DIR=.stack gunicorn --workers 1 "devstack.rollout_service:create_app()"

The rollout service itself (rollout/) knows only Cloud Functions; the stack injects its own
targets here, so that deployable imports nothing of the stack.
"""

from __future__ import annotations

import os

from flask import Flask

from devstack.rollout_target import LocalFunctionTarget
from rollout.app import create_app as create_rollout_app
from rollout.settings import RolloutSettings


def create_app() -> Flask:
    settings = RolloutSettings.from_env()
    stack_dir = os.environ.get("STACK_DIR", ".stack")
    targets = {alias: LocalFunctionTarget(stack_dir, key) for alias, key in settings.aliases.items()}
    return create_rollout_app(settings, targets=targets)
