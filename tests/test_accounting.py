"""The account's counters as a scrape reads them (spoa_mirror/accounting.py through metrics.py's
collector, in process): what a fresh target, message account and pairing table start at, and the
counters that only pipelining or a compare section move. Unit tests, so mutation testing can run them
by the hundred; tests/test_transport_pipelining.py and tests/test_compare_table.py drive the same
counters through real connections."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from spoa_mirror.accounting import MessageStats, PairingStats, TargetStats
from spoa_mirror.metrics import MirrorCollector
from spoe import AgentStats


def scrape(messages: MessageStats, targets: dict[str, TargetStats]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MirrorCollector(AgentStats, lambda: messages, lambda: targets, dict))
    return registry


def test_a_fresh_target_scrapes_at_zero_with_no_capture_or_compare_families() -> None:
    """Before any request a target's resent count is 0, and the capture and compare families are
    absent: the target captures nothing and no compare section is set (None, not just falsy)."""
    registry = scrape(MessageStats(), {"t": TargetStats()})
    assert registry.get_sample_value("spoa_mirror_pipeline_resent_total", {"target": "t"}) == 0
    text = generate_latest(registry).decode()
    assert "spoa_mirror_capture_" not in text
    assert "spoa_mirror_compare_" not in text


def test_requests_sent_again_add_up_per_target() -> None:
    """count_resent adds each batch a Connection: close response sent again."""
    stats = TargetStats()
    stats.count_resent(2)
    stats.count_resent(3)
    registry = scrape(MessageStats(), {"t": stats})
    assert registry.get_sample_value("spoa_mirror_pipeline_resent_total", {"target": "t"}) == 5


def test_a_new_pairing_table_starts_empty_with_its_bounds() -> None:
    """Every result of the primary's response messages starts at 0, as do the entries and bytes
    held; the bounds are the compare section's."""
    pairing = PairingStats(max_entries=7, max_bytes=4096)
    assert pairing.primary_responses == {"paired": 0, "unmatched": 0, "invalid": 0, "refused": 0}
    assert (pairing.entries, pairing.held_bytes, pairing.max_entries, pairing.max_bytes) == (0, 0, 7, 4096)
    messages = MessageStats()
    messages.pairing = pairing
    registry = scrape(messages, {})
    for result in ("paired", "unmatched", "invalid", "refused"):
        sample = registry.get_sample_value("spoa_mirror_compare_primary_responses_total", {"result": result})
        assert sample == 0
    assert registry.get_sample_value("spoa_mirror_compare_table_max_bytes") == 4096
