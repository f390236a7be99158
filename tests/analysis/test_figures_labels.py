"""Labels made from model text show literally in plotly: no tag, entity or LaTeX of a token becomes
markup. The check replays how plotly.js (svg_text_utils, as bundled with the installed plotly)
turns a label into SVG text: split at tags, then decode entities in each text part."""

from __future__ import annotations

import re

import torch

from deepalign.analysis.figures import (
    comparison_heatmaps,
    figure_data,
    head_heatmap,
    plain_label,
    position_lines,
    token_layer_map,
)

TOKEN = "<b>x</b><a href='http://e'>y</a>"
NASTY = [TOKEN, "<br>", "<span style='color:red'>z</span>", "a &lt; b &amp; c", "$x^2$", "&#60;i&#62;", "<sup>2"]

# plotly.js: SPLIT_TAGS, ONE_TAG, the tags it styles, its named entities and LaTeX detection (FIND_TEX).
SPLIT_TAGS = re.compile(r"(<[^<>]*>)")
ONE_TAG = re.compile(r"<(/?)([^ >]*)(\s+(.*))?>", re.I)
TAGS = {"sup", "sub", "s", "u", "b", "i", "a", "span", "em", "br"}
ENTITIES = {"mu": "μ", "amp": "&", "lt": "<", "gt": ">", "nbsp": "\xa0", "times": "×", "plusmn": "±", "deg": "°"}
ENTITY = re.compile(r"&(#\d+|#x[\da-fA-F]+|[a-z]+);")
FIND_TEX = re.compile(r"([^$]*)([$]+[^$]*[$]+)([^$]*)")


def _entity(match: re.Match) -> str:
    code = match.group(1)
    if code.startswith("#"):
        return chr(int(code[2:], 16) if code[1] == "x" else int(code[1:]))
    return ENTITIES.get(code, match.group())


def rendered(label: str) -> tuple[str, list[str]]:
    """``(text shown, markup tags found)`` for a label, as plotly.js draws it."""
    shown, tags = [], []
    for part in SPLIT_TAGS.split(label.replace("\n", " ")):
        tag = ONE_TAG.match(part)
        if tag and tag.group(2).lower() in TAGS:
            tags.append(part)
        else:
            shown.append(ENTITY.sub(_entity, part))
    if FIND_TEX.match(label) and FIND_TEX.match(label).group(2):
        tags.append("$…$")
    return "".join(shown), tags


def test_plain_label_shows_every_character_and_no_markup():
    for text in NASTY:
        assert rendered(text)[1] or "&" in text  # as given, each is markup (or an entity plotly decodes)
        label = plain_label(text)
        assert rendered(label) == (text, []), text
    assert plain_label("plain text, 3 < 4") == "plain text, 3 &lt; 4"


def test_token_labels_titles_and_names_carry_no_markup():
    tokens = [TOKEN, "$x$", "a & b"]
    heat = token_layer_map(torch.rand(2, 3), tokens, f"attention received: {TOKEN}")
    labels = list(heat.data[0].x)
    assert not any("<b>" in label or "<a " in label or "$" in label for label in labels)
    assert [rendered(label) for label in labels] == [(f"{i}:{t}", []) for i, t in enumerate(tokens)]
    assert rendered(heat.layout.title.text) == (f"attention received: {TOKEN}", [])
    lines = position_lines({TOKEN: torch.rand(2, 4)}, TOKEN, yaxis=TOKEN)
    texts = [trace.name for trace in lines.data] + [lines.layout.title.text, lines.layout.yaxis.title.text]
    assert all(rendered(text)[1] == [] and "<b>" not in text for text in texts)
    comparison = comparison_heatmaps(torch.rand(2, 2), torch.rand(2, 2), (TOKEN, "<i>m</i>"))
    titles = [annotation.text for annotation in comparison.layout.annotations]
    assert [rendered(title)[0] for title in titles] == [TOKEN, "<i>m</i>", f"<i>m</i> − {TOKEN}"]
    assert all(rendered(title)[1] == [] for title in titles)
    head = head_heatmap(torch.rand(2, 2), TOKEN, colorbar="<b>mass</b>")
    assert rendered(head.layout.title.text) == (TOKEN, []) and "<b>" not in head.data[0].colorbar.title.text


def test_figure_data_gives_the_original_text_back():
    tokens = [TOKEN, "&amp;", "$"]
    data = figure_data(token_layer_map(torch.rand(1, 3), tokens, TOKEN))
    assert data["title"] == TOKEN and data["traces"][0]["x"] == [f"{i}:{t}" for i, t in enumerate(tokens)]
    assert figure_data(position_lines({TOKEN: torch.rand(1, 2)}, "t", yaxis="y"))["traces"][1]["name"] == TOKEN
