"""Event ids (stream.ids.Position), epochs, and both services' configuration."""

from __future__ import annotations

import re

import pytest
from publisher.config import Config as PublisherConfig
from publisher.config import ConfigError as PublisherConfigError
from publisher.contract import key_prefix, new_epoch, partition_of
from stream.config import Config as StreamConfig
from stream.config import ConfigError as StreamConfigError
from stream.history import new_epoch as stream_new_epoch
from stream.ids import BadEventId, Position

from tests.support import keys

# -- event ids -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "epoch", "seq"),
    [
        ("3f9c0a1be2d4-1042", "3f9c0a1be2d4", 1042),
        ("000000000000-0", "000000000000", 0),
        ("abcdefabcdef-1", "abcdefabcdef", 1),
        ("0123456789ab-" + "9" * 18, "0123456789ab", 10**18 - 1),
    ],
)
def test_position_parse_and_str_round_trip(text: str, epoch: str, seq: int) -> None:
    position = Position.parse(text)
    assert position == Position(epoch, seq)
    assert str(position) == text
    assert Position.parse(str(position)) == position


def test_position_str_is_epoch_dash_seq() -> None:
    assert str(Position("3f9c0a1be2d4", 7)) == "3f9c0a1be2d4-7"


@pytest.mark.parametrize("text", [" 3f9c0a1be2d4-5", "3f9c0a1be2d4-5 ", "\t3f9c0a1be2d4-5\r\n"])
def test_surrounding_whitespace_is_ignored(text: str) -> None:
    assert Position.parse(text) == Position("3f9c0a1be2d4", 5)


def test_leading_zeros_in_seq_are_read_as_a_number() -> None:
    assert Position.parse("3f9c0a1be2d4-007") == Position("3f9c0a1be2d4", 7)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "nonsense",
        "3f9c0a1be2d4",  # missing seq
        "3f9c0a1be2d4-",  # missing seq
        "3f9c0a1be2d45",  # no dash
        "-5",  # missing epoch
        "3f9c0a1be2d-5",  # epoch of 11
        "3f9c0a1be2d4a-5",  # epoch of 13
        "3F9C0A1BE2D4-5",  # uppercase hex
        "3f9c0a1bE2d4-5",
        "3f9c0a1be2g4-5",  # not hex
        "3f9c0a1be2d4--5",  # negative
        "3f9c0a1be2d4-+5",
        "3f9c0a1be2d4-" + "1" * 19,  # seq too long
        "3f9c0a1be2d4-5-0",
        "3f9c0a1be2d4-5.0",
        "3f9c0a1be2d4-1e3",
        "3f9c0a1be2d4- 5",  # whitespace inside
        "3f9c0a1be2d4 -5",
        "3f9c0a1be2d4-5\x00",
        "3f9c0a1be2d4-٣",  # a non-ASCII digit
        "\uff13f9c0a1be2d4-5",  # a full-width digit in the epoch
    ],
)
def test_malformed_ids_raise_bad_event_id(text: str) -> None:
    with pytest.raises(BadEventId):
        Position.parse(text)


def test_bad_event_id_is_a_value_error_with_a_message() -> None:
    with pytest.raises(ValueError, match="12 hex"):
        Position.parse("x")


# -- epochs --------------------------------------------------------------------


@pytest.mark.parametrize("make", [new_epoch, stream_new_epoch])
def test_new_epoch_is_12_lowercase_hex_and_different_each_call(make: object) -> None:
    assert callable(make)
    epochs = [make() for _ in range(200)]
    for epoch in epochs:
        assert isinstance(epoch, str)
        assert re.fullmatch(r"[0-9a-f]{12}", epoch), epoch
    assert len(set(epochs)) == len(epochs)
    # An epoch is a valid id prefix.
    assert Position.parse(f"{epochs[0]}-1").epoch == epochs[0]


# -- publisher configuration ---------------------------------------------------


def test_publisher_defaults() -> None:
    config = PublisherConfig.from_env({})
    assert config == PublisherConfig()
    assert config.redis_url == "redis://localhost:6379/0"
    assert config.publish_tokens == ()
    assert config.max_batch == 100
    assert config.max_event_bytes == 65536
    assert config.max_body_bytes == 1048576
    assert config.history_maxlen == 1000
    assert config.history_ttl_seconds == 604800
    assert config.redis_timeout_seconds == 2.0
    assert config.retry_after_seconds == 2


def test_publisher_blank_values_mean_the_default() -> None:
    blank = {
        name: "  "
        for name in ("REDIS_URL", "PUBLISH_TOKEN", "MAX_BATCH", "MAX_EVENT_BYTES", "HISTORY_MAXLEN")
    }
    assert PublisherConfig.from_env(blank) == PublisherConfig()


def test_publisher_values_are_read() -> None:
    config = PublisherConfig.from_env(
        {
            "REDIS_URL": " redis://redis:6380/2 ",
            "MAX_BATCH": "5",
            "MAX_EVENT_BYTES": "100",
            "MAX_BODY_BYTES": " 2000 ",
            "HISTORY_MAXLEN": "10",
            "HISTORY_TTL_SECONDS": "60",
            "REDIS_TIMEOUT_SECONDS": "0.25",
            "RETRY_AFTER_SECONDS": "7",
        }
    )
    assert config.redis_url == "redis://redis:6380/2"
    assert (config.max_batch, config.max_event_bytes, config.max_body_bytes) == (5, 100, 2000)
    assert config.history_maxlen == 10
    assert config.history_ttl_seconds == 60
    assert config.redis_timeout_seconds == 0.25
    assert config.retry_after_seconds == 7


def test_history_ttl_zero_means_no_expiry_and_negative_is_refused() -> None:
    assert PublisherConfig.from_env({"HISTORY_TTL_SECONDS": "0"}).history_ttl_seconds == 0
    for bad in ("-1", "abc", "1.5"):
        with pytest.raises(PublisherConfigError, match="HISTORY_TTL_SECONDS"):
            PublisherConfig.from_env({"HISTORY_TTL_SECONDS": bad})


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ("tok1", ("tok1",)),
        ("tok1,tok2", ("tok1", "tok2")),
        (" tok1 , tok2 ", ("tok1", "tok2")),
        ("tok1,,tok2,", ("tok1", "tok2")),
        (",", ()),
        (" , ,", ()),
        ("", ()),
    ],
)
def test_publish_token_is_a_comma_separated_list(value: str, tokens: tuple[str, ...]) -> None:
    assert PublisherConfig.from_env({"PUBLISH_TOKEN": value}).publish_tokens == tokens


@pytest.mark.parametrize(
    "name",
    [
        "MAX_BATCH",
        "MAX_EVENT_BYTES",
        "MAX_BODY_BYTES",
        "HISTORY_MAXLEN",
        "RETRY_AFTER_SECONDS",
    ],
)
@pytest.mark.parametrize("value", ["abc", "1.5", "0", "-1", "nan", "inf", "0x10"])
def test_publisher_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(PublisherConfigError, match=name):
        PublisherConfig.from_env({name: value})


def test_publisher_partitions_and_redis_mode() -> None:
    config = PublisherConfig.from_env({"PARTITIONS": "16", "REDIS_MODE": "cluster"})
    assert (config.partitions, config.redis_mode) == (16, "cluster")
    assert (PublisherConfig().partitions, PublisherConfig().redis_mode) == (1, "standalone")
    blank = PublisherConfig.from_env({"PARTITIONS": " ", "REDIS_MODE": " "})
    assert (blank.partitions, blank.redis_mode) == (1, "standalone")
    assert PublisherConfig.from_env({"PARTITIONS": "1024"}).partitions == 1024
    assert PublisherConfig.from_env({"REDIS_MODE": " standalone "}).redis_mode == "standalone"


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "abc", "1025", "1e9", "nan"])
def test_publisher_partitions_out_of_range_are_refused(value: str) -> None:
    with pytest.raises(PublisherConfigError, match="PARTITIONS"):
        PublisherConfig.from_env({"PARTITIONS": value})


@pytest.mark.parametrize("value", ["sentinel", "clustered", "standalone,cluster", "1"])
def test_publisher_unknown_redis_mode_is_refused_with_the_choices(value: str) -> None:
    with pytest.raises(PublisherConfigError, match="REDIS_MODE must be one of standalone, cluster"):
        PublisherConfig.from_env({"REDIS_MODE": value})


@pytest.mark.parametrize("partitions", [1, 2, 8, 16, 1024])
def test_publisher_partitions_are_crc32_of_the_channel_as_the_contract_says(partitions: int) -> None:
    names = ["", "a", "news", "chat.room-1", "private-x:y_z", "x" * 128, *(f"c.{i}" for i in range(50))]
    for name in names:
        number = partition_of(name, partitions)
        assert number == keys.partition(name, partitions)
        assert keys.meta_key(name, partitions) == key_prefix(number) + "meta"
        assert keys.stream_key(name, partitions) == key_prefix(number) + "stream:" + name


# -- stream service configuration -------------------------------------------------


def test_stream_defaults() -> None:
    config = StreamConfig.from_env({})
    assert config == StreamConfig()
    assert config.redis_url == "redis://localhost:6379/0"
    assert config.max_channels_per_stream == 16
    assert config.retry_ms == 3000
    assert config.heartbeat_seconds == 15.0
    assert config.max_connections == 10000
    assert config.client_buffer_bytes == 262144
    assert config.watchdog_seconds == 10.0
    assert config.subscribe_timeout_seconds == 5.0
    assert config.redis_pool_size == 8
    assert config.retry_after_seconds == 2


def test_stream_values_are_read() -> None:
    config = StreamConfig.from_env(
        {
            "REDIS_URL": "redis://r:1/0",
            "MAX_CHANNELS_PER_STREAM": "4",
            "RETRY_MS": "0",
            "HEARTBEAT_SECONDS": "0.5",
            "MAX_CONNECTIONS": "3",
            "CLIENT_BUFFER_BYTES": "2048",
            "WATCHDOG_SECONDS": "2.5",
            "SUBSCRIBE_TIMEOUT_SECONDS": "1",
            "REDIS_POOL_SIZE": "2",
            "RETRY_AFTER_SECONDS": "9",
        }
    )
    assert config == StreamConfig(
        redis_url="redis://r:1/0",
        max_channels_per_stream=4,
        retry_ms=0,
        heartbeat_seconds=0.5,
        max_connections=3,
        client_buffer_bytes=2048,
        watchdog_seconds=2.5,
        subscribe_timeout_seconds=1.0,
        redis_pool_size=2,
        retry_after_seconds=9,
    )


STREAM_MINIMUMS = {
    "MAX_CHANNELS_PER_STREAM": "0",
    "RETRY_MS": "-1",
    "HEARTBEAT_SECONDS": "0.05",
    "MAX_CONNECTIONS": "0",
    "CLIENT_BUFFER_BYTES": "1023",
    "WATCHDOG_SECONDS": "0.4",
    "SUBSCRIBE_TIMEOUT_SECONDS": "0",
    "REDIS_POOL_SIZE": "0",
    "RETRY_AFTER_SECONDS": "0",
}


@pytest.mark.parametrize(("name", "below"), STREAM_MINIMUMS.items())
def test_stream_values_below_their_minimum_name_the_variable(name: str, below: str) -> None:
    with pytest.raises(StreamConfigError, match=name):
        StreamConfig.from_env({name: below})


@pytest.mark.parametrize("name", STREAM_MINIMUMS)
@pytest.mark.parametrize("value", ["abc", "", "-inf", "1,5"])
def test_stream_non_numbers_name_the_variable(name: str, value: str) -> None:
    if value == "":
        # Blank means the default, not an error.
        assert StreamConfig.from_env({name: value}) == StreamConfig()
        return
    with pytest.raises(StreamConfigError, match=name):
        StreamConfig.from_env({name: value})


@pytest.mark.parametrize("name", ["HEARTBEAT_SECONDS", "WATCHDOG_SECONDS", "MAX_CONNECTIONS"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_stream_non_finite_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(StreamConfigError, match=name):
        StreamConfig.from_env({name: value})


def test_waiting_for_replicas_must_end_before_the_redis_timeout() -> None:
    config = PublisherConfig.from_env({"PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT_SECONDS": "0.25"})
    assert (config.wait_replicas, config.wait_timeout_seconds) == (1, 0.25)
    with pytest.raises(PublisherConfigError, match="PUBLISH_WAIT_TIMEOUT_SECONDS must be below"):
        PublisherConfig.from_env({"PUBLISH_WAIT_REPLICAS": "1", "PUBLISH_WAIT_TIMEOUT_SECONDS": "2"})
    # Off (the default), the timeout is not used and not checked.
    assert PublisherConfig.from_env({"PUBLISH_WAIT_TIMEOUT_SECONDS": "5"}).wait_replicas == 0
