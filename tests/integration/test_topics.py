"""`ensure_topics` on the real broker: creation, idempotence, co-partitioned state topic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient
from kafka_fixtures import unique_name

from stream_rnn.ops.settings import Settings
from stream_rnn.stream.topics import TopicError, ensure_topics, partition_counts


@pytest.fixture
def admin(kafka_broker: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_broker, client_id="tests-topics")
    yield client
    client.close()


def _settings() -> Settings:
    return Settings(
        tokens_topic=unique_name("tok"),
        predictions_topic=unique_name("pred"),
        dead_letter_topic=unique_name("dl"),
        partitions=3,
    )


def test_creates_all_topics_once(kafka_broker: str, admin: KafkaAdminClient) -> None:
    settings = _settings()
    layout = ensure_topics(kafka_broker, settings)
    names = [layout.tokens, layout.state, layout.predictions, layout.dead_letters]
    try:
        assert layout.state == f"{settings.tokens_topic}-state" and layout.partitions == 3
        assert partition_counts(admin, names) == dict.fromkeys(names, 3)
        resource = ConfigResource(ConfigResourceType.TOPIC, layout.state)
        described = admin.describe_configs([resource])
        assert described["topic"][layout.state]["cleanup.policy"]["value"] == "compact"
        # idempotent, with or without the (matching) partition count
        assert ensure_topics(kafka_broker, settings) == layout
        assert ensure_topics(kafka_broker, settings, partitions=3) == layout
        with pytest.raises(TopicError, match=r"exists with 3 partitions, not the 5 asked for"):
            ensure_topics(kafka_broker, settings, partitions=5)
    finally:
        admin.delete_topics(names, timeout_ms=10_000)


def test_existing_tokens_topic_keeps_its_count_and_state_must_match(
    kafka_broker: str, admin: KafkaAdminClient
) -> None:
    settings = _settings()
    tokens, state = settings.tokens_topic, f"{settings.tokens_topic}-state"
    admin.create_topics({tokens: {"num_partitions": 2, "replication_factor": 1}})
    try:
        layout = ensure_topics(kafka_broker, settings)  # settings say 3; the topic has 2
        assert layout.partitions == 2
        assert partition_counts(admin, [state, settings.predictions_topic]) == {
            state: 2,
            settings.predictions_topic: 2,
        }
        admin.delete_topics([state], timeout_ms=10_000)
        admin.create_topics({state: {"num_partitions": 4, "replication_factor": 1}})
        with pytest.raises(
            TopicError, match=r"has 4 partitions but .* has 2; they must be co-partitioned"
        ):
            ensure_topics(kafka_broker, settings)
    finally:
        existing = set(admin.list_topics())
        names = [tokens, state, settings.predictions_topic, settings.dead_letter_topic]
        admin.delete_topics([n for n in names if n in existing], timeout_ms=10_000)


def test_unreachable_broker_is_a_clear_error() -> None:
    with pytest.raises(TopicError, match="cannot reach Kafka at 127.0.0.1:1"):
        ensure_topics("127.0.0.1:1", _settings(), connect_timeout_s=1)
