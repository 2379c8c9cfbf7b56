"""Templates in added header values: `{{uuid}}` renders a fresh version-4 UUID in its standard text
form each call, around any literal text."""

from __future__ import annotations

import uuid

from spoa_mirror.header_templates import compile_value, random_uuid, split_added_headers


def test_random_uuid_is_a_version_4_uuid_in_standard_form() -> None:
    seen = set()
    for _ in range(2000):
        text = random_uuid()
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
        seen.add(text)
    assert len(seen) == 2000


def test_templates_render_around_literal_text_and_fresh_each_time() -> None:
    render = compile_value("a-{{uuid}}-b-{{ uuid }}")
    first, second = render(), render()
    assert first != second
    prefix, id1, middle, id2 = first[:2], first[2:38], first[38:41], first[41:]
    assert (prefix, middle) == ("a-", "-b-")
    assert uuid.UUID(id1).version == uuid.UUID(id2).version == 4


def test_only_headers_with_a_template_are_rendered_per_request() -> None:
    static, templated = split_added_headers({"X-Env": "shadow {x}", "X-Request-ID": "{{uuid}}"})
    assert static == [("X-Env", "shadow {x}")]
    assert [name for name, _ in templated] == ["X-Request-ID"]
