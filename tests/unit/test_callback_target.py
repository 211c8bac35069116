"""Where a webhook may go (contracts/callback_target.py) and how the gateway applies it to an
upload's `callback_url` (gateway/http/callbacks.py): http(s) to a host, no credentials, at most
2048 characters, and only public addresses unless SLUICE_WEBHOOK_ALLOW_PRIVATE."""

from __future__ import annotations

import pytest

from contracts.callback_target import (
    MAX_URL_LENGTH,
    CallbackRefused,
    address_problem,
    check_addresses,
    parse_callback_url,
)
from contracts.settings import Settings
from gateway.http.callbacks import resolve_callback_url
from gateway.http.errors import ApiError


def test_a_plain_url_is_taken_apart() -> None:
    target = parse_callback_url("https://Hooks.Example.com/sluice?x=1")
    assert (target.scheme, target.host, target.port) == ("https", "hooks.example.com", 443)
    assert target.host_header == "hooks.example.com"
    assert target.pinned("93.184.215.14") == "https://93.184.215.14/sluice?x=1"


def test_ports_and_ipv6_literals_keep_their_form() -> None:
    target = parse_callback_url("http://[2606:4700::1111]:8080/in")
    assert (target.host, target.port) == ("2606:4700::1111", 8080)
    assert target.host_header == "[2606:4700::1111]:8080"
    assert target.pinned("2606:4700::1111") == "http://[2606:4700::1111]:8080/in"


def test_an_international_name_is_sent_in_its_ascii_form() -> None:
    assert parse_callback_url("https://bücher.example/in").host == "xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("ftp://example.com/in", "use an http:// or https:// URL"),
        ("file:///etc/passwd", "use an http:// or https:// URL"),
        ("javascript:alert(1)", "use an http:// or https:// URL"),
        ("example.com/in", "use an http:// or https:// URL"),
        ("https:///in", "names no host"),
        ("https://user:pw@example.com/in", "credentials"),
        ("https://token@example.com/in", "credentials"),
        ("https://example.com:99999/in", "not a valid URL"),
        ("https://exa mple.com/in", "spaces or control characters"),
        ("https://example.com/in\r\nX-Evil: 1", "spaces or control characters"),
        ("", "empty"),
        ("https://example.com/" + "a" * MAX_URL_LENGTH, f"at most {MAX_URL_LENGTH}"),
    ],
)
def test_urls_of_the_wrong_form_are_refused_saying_what_to_change(url: str, said: str) -> None:
    with pytest.raises(CallbackRefused) as refused:
        parse_callback_url(url)
    assert refused.value.code == "invalid_callback_url"
    assert said in refused.value.message


def test_the_longest_url_allowed_is_allowed() -> None:
    url = "https://example.com/" + "a" * (MAX_URL_LENGTH - len("https://example.com/"))
    assert len(url) == MAX_URL_LENGTH
    assert parse_callback_url(url).host == "example.com"


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
    ],
)
def test_addresses_beside_sluice_may_not_receive_webhooks(address: str, kind: str) -> None:
    assert address_problem(address) == f"a{'n' if kind[0] in 'aeiou' else ''} {kind} address"


@pytest.mark.parametrize("address", ["93.184.215.14", "1.1.1.1", "2606:4700::1111"])
def test_public_addresses_may(address: str) -> None:
    assert address_problem(address) is None


def test_one_bad_address_among_good_ones_refuses_the_name() -> None:
    target = parse_callback_url("https://rebinding.example/in")
    with pytest.raises(CallbackRefused) as refused:
        check_addresses(target, ["93.184.215.14", "10.0.0.7"], allow_private=False)
    message = refused.value.message
    assert "10.0.0.7, a private address" in message
    assert "SLUICE_WEBHOOK_ALLOW_PRIVATE" in message
    check_addresses(target, ["93.184.215.14", "10.0.0.7"], allow_private=True)


def test_a_name_without_addresses_is_refused_even_when_private_ones_are_allowed() -> None:
    with pytest.raises(CallbackRefused, match="resolves to no address"):
        check_addresses(parse_callback_url("https://x.example/"), [], allow_private=True)


# --- the gateway's side: the upload's URL, else the key's default, checked and resolved -------


async def test_no_url_anywhere_means_no_webhook() -> None:
    assert await resolve_callback_url(None, None, Settings()) is None
    assert await resolve_callback_url("  ", "key-a", Settings()) is None


async def test_loopback_is_refused_without_the_setting_and_taken_with_it() -> None:
    url = "http://127.0.0.1:9/hook"
    with pytest.raises(ApiError) as refused:
        await resolve_callback_url(url, None, Settings())
    assert (refused.value.status, refused.value.code) == (400, "invalid_callback_url")
    assert "127.0.0.1, a loopback address" in refused.value.message
    assert await resolve_callback_url(url, None, Settings(webhook_allow_private=True)) == url


async def test_a_name_is_resolved_and_every_address_checked() -> None:
    # `localhost` resolves without a network, to loopback addresses only.
    with pytest.raises(ApiError) as refused:
        await resolve_callback_url("http://localhost:8080/hook", None, Settings())
    assert "loopback address" in refused.value.message
    with pytest.raises(ApiError) as unknown:
        await resolve_callback_url("https://no-such-host.invalid/hook", None, Settings())
    assert "could not be resolved" in unknown.value.message


async def test_the_key_default_applies_when_the_upload_names_none() -> None:
    settings = Settings(
        key_callback_urls={"key-a": "http://127.0.0.1:7/a", "key-b": "http://127.0.0.1:7/b"},
        webhook_allow_private=True,
    )
    assert await resolve_callback_url(None, "key-a", settings) == "http://127.0.0.1:7/a"
    assert await resolve_callback_url(None, "key-c", settings) is None
    # The upload's own URL wins over its key's default.
    own = "http://127.0.0.1:7/own"
    assert await resolve_callback_url(own, "key-b", settings) == own


async def test_a_refused_key_default_blames_the_setting_not_the_upload() -> None:
    settings = Settings(key_callback_urls={"key-a": "ftp://example.com/a"})
    with pytest.raises(ApiError) as refused:
        await resolve_callback_url(None, "key-a", settings)
    assert refused.value.status == 400
    assert "SLUICE_KEY_CALLBACK_URLS" in refused.value.message
