"""Each deployable as it ships: its own environment, built only from what its image or upload installs, and
only the files its image copies.

    python -m devstack.deployables build     # make setup runs this: one venv per deployable under .venv/deployables/

The local stack starts the function, the backend, the rollout controller and the MLflow server from these,
never from the development venv, which has every package of the project: a dependency missing from a
deployable's requirements then fails here as it would fail on Google Cloud, and so does an import of a
file its image does not copy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVIRONMENTS = Path(os.environ.get("DEPLOYABLE_ENVIRONMENTS", REPO / ".venv" / "deployables"))


@dataclass(frozen=True)
class Deployable:
    name: str
    # The Dockerfile it is built from (its requirements and the files it copies are read there); None for the
    # function, which Cloud Functions builds from its source folder and requirements.txt.
    dockerfile: str | None = None
    requirements: str | None = None
    # Copied beside the image's files for the local stack only, with why (never shipped).
    local_only: tuple[str, ...] = ()

    @property
    def environment(self) -> Path:
        return ENVIRONMENTS / self.name

    def bin(self, program: str) -> str:
        return str(self.environment / "bin" / program)

    def requirements_file(self) -> Path:
        if self.requirements:
            return REPO / self.requirements
        copies, install = image_recipe(REPO / self.dockerfile)
        return REPO / copies[install]

    def image_env(self) -> dict[str, str]:
        """The environment its image sets (its Dockerfile's ENV, but PORT: the stack gives each its own address).
        The function's runtime is Google's: only what keeps its source folder, the upload, free of bytecode."""
        if self.dockerfile is None:
            return {"PYTHONDONTWRITEBYTECODE": "1"}
        from dockerfile_parse import DockerfileParser

        envs = DockerfileParser(path=str(REPO / self.dockerfile)).envs
        return {name: value for name, value in envs.items() if name != "PORT"}

    def shipped_files(self) -> list[str]:
        """The repository paths the image copies into its working folder (requirements aside)."""
        if self.dockerfile is None:
            return []
        copies, install = image_recipe(REPO / self.dockerfile)
        return [source for destination, source in copies.items() if destination != install]


FUNCTION = Deployable("function", requirements="serving_function/requirements.txt")
BACKEND = Deployable("backend", dockerfile="backend/Dockerfile")
# devstack/: the stack's function deployments stand in for Cloud Run as the controller's targets
# (devstack.rollout_service injects them); the image has rollout.cloud's gcloud targets instead.
ROLLOUT = Deployable("rollout", dockerfile="rollout/Dockerfile", local_only=("devstack/",))
TRACKING_SERVER = Deployable("mlflow", dockerfile="tracking_server/Dockerfile")
DEPLOYABLES = {d.name: d for d in (FUNCTION, BACKEND, ROLLOUT, TRACKING_SERVER)}


def image_recipe(dockerfile: Path) -> tuple[dict[str, str], str]:
    """What a Dockerfile copies (its destination under WORKDIR -> the repository path) and the destination of
    the requirements file its `pip install -r` line installs."""
    from dockerfile_parse import DockerfileParser

    parser = DockerfileParser(path=str(dockerfile))
    copies: dict[str, str] = {}
    install = ""
    for instruction in parser.structure:
        words = instruction["value"].split()
        if instruction["instruction"] == "COPY":
            *sources, destination = words
            for source in sources:
                target = (
                    destination + Path(source).name if destination.endswith("/") and not source.endswith("/") else destination
                )
                copies[target] = source
        elif instruction["instruction"] == "RUN" and "pip install -r" in instruction["value"]:
            install = words[words.index("-r") + 1]
    if not install or install not in copies:
        raise ValueError(f"{dockerfile}: no `pip install -r` of a copied requirements file")
    return copies, install


def stage(deployable: Deployable, folder: Path) -> Path:
    """A working folder holding what the image copies (links into the repository, so edits show at once),
    plus its local-only parts: a deployable run from there imports nothing its image lacks."""
    sources = [source.rstrip("/") for source in [*deployable.shipped_files(), *deployable.local_only]]
    staged = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_symlink()) if folder.exists() else []
    if folder.exists() and staged == sorted(sources):
        return folder  # as it is: another replica may be running from it
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for source in sources:
        link = folder / source
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(REPO / source)
    return folder


def build(deployable: Deployable) -> None:
    """A new venv with exactly the deployable's requirements: made again from nothing, so a requirement
    removed from its file is gone from its environment too (uv's cache keeps this fast)."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or "uv"
    if deployable.environment.exists():
        shutil.rmtree(deployable.environment)
    subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(deployable.environment)], check=True)
    python = deployable.bin("python")
    # Compiled at install, as pip compiles in the image: the Dockerfiles' ENV PYTHONDONTWRITEBYTECODE=1 means
    # nothing is cached later, and each start would compile MLflow, Flask or pandas again from source.
    subprocess.run(
        [uv, "pip", "install", "--quiet", "--compile-bytecode", "--python", python, "-r", str(deployable.requirements_file())],
        check=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("names", nargs="*", default=list(DEPLOYABLES), help="default: every deployable")
    args = parser.parse_args(argv)
    for name in args.names:
        build(DEPLOYABLES[name])
        print(f"{name}: {DEPLOYABLES[name].environment} from {DEPLOYABLES[name].requirements_file().relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
