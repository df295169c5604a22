"""CRAM-MD5 answers from plain passwords and from E-MailRelay's hashed ``md5`` secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailrelay.cram_md5 import (Md5State, cram_md5_digest, cram_md5_response, hashed_secret,
                                parse_hashed_secret)
from mailrelay.secrets import Secret, read_secrets

RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"

# emailrelay-passwd output quoted in E-MailRelay's own sources: test/emailrelay_chain_test.sh
# ("encrypted version of carols_password") and doc/reference.md, whose md5 example lines
# hash the passwords of its plain example lines.
CAROL_BASE64 = "3QiB7qqFvxf/O0TC95BhyFj1uZLjonjXsqFjmBHc860="
CAROL_DOTTED = ("4001433821.398427562.3259251711.3361837303."
                "2461660504.3615007459.2556666290.2918439953")


def plain(password: str) -> Secret:
    return Secret("client", "plain", "tim", password, 1)


def md5(hashed: str) -> Secret:
    return Secret("client", "md5", "tim", hashed, 1)


def test_rfc2195_example_with_a_plain_password():
    assert cram_md5_digest(plain("tanstaaftanstaaf"), RFC2195_CHALLENGE) == RFC2195_DIGEST
    assert (cram_md5_response("tim", plain("tanstaaftanstaaf"), RFC2195_CHALLENGE)
            == "dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw")


def test_rfc2195_example_with_a_hashed_secret():
    secret = md5(hashed_secret("tanstaaftanstaaf"))
    assert cram_md5_digest(secret, RFC2195_CHALLENGE) == RFC2195_DIGEST
    assert base64.b64decode(cram_md5_response("tim", secret, RFC2195_CHALLENGE)) == \
        b"tim " + RFC2195_DIGEST.encode()


@pytest.mark.parametrize("password, printed", [
    ("carols_password", CAROL_BASE64),
    ("password123", "9N2IRYVXqu7SkOW1Xat+wpR9NbA2R6fb61XlmqW+46E="),
    ("e=mc2", "v1HOpuLIbbvgoJjhueeoqwfvtIp2C+gMA285ke+xxow="),
    ("my password", "x6UJKQF9f7HfhS1M+PW4s8rXIoT+L+WoqLz+rBwSKbw="),
])
def test_hashed_secret_prints_what_emailrelay_passwd_prints(password, printed):
    assert hashed_secret(password) == printed


def test_dotted_form_matches_emailrelay_passwd_dotted():
    assert hashed_secret("carols_password", dotted=True) == CAROL_DOTTED
    assert parse_hashed_secret(CAROL_DOTTED) == parse_hashed_secret(CAROL_BASE64)
    assert (cram_md5_digest(md5(CAROL_DOTTED), RFC2195_CHALLENGE)
            == cram_md5_digest(plain("carols_password"), RFC2195_CHALLENGE))


def test_an_md5_line_from_a_secrets_file_answers_the_challenge(tmp_path):
    path = tmp_path / "client.auth"
    path.write_text(f"client md5 carol {CAROL_BASE64}\n")
    [secret] = read_secrets(path)
    response = cram_md5_response(secret.name, secret, RFC2195_CHALLENGE)
    expected = hmac.new(b"carols_password", RFC2195_CHALLENGE, "md5").hexdigest()
    assert base64.b64decode(response).decode() == f"carol {expected}"


def test_the_sample_line_in_emailrelay_auth_is_not_a_usable_secret():
    # etc/emailrelay.auth.in and doc/emailrelay-passwd.1 show this value: it is 33 bytes,
    # a stray ':' and then the states for "secret"; E-MailRelay itself rejects it too.
    sample = "Oqng9/H7wAyKgbuqw5VzG1bNO6feqtblyiNEi6QuN5dH"
    assert base64.b64decode(sample)[1:] == base64.b64decode(hashed_secret("secret"))
    with pytest.raises(ValueError, match="32 bytes"):
        cram_md5_digest(md5(sample), RFC2195_CHALLENGE)


@pytest.mark.parametrize("bad", ["not base64!", "", "AAAA", "1.2.3.4.5.6.7.4294967296"])
def test_malformed_md5_secrets_are_refused(bad):
    with pytest.raises(ValueError):
        cram_md5_digest(md5(bad), RFC2195_CHALLENGE)


def test_other_secret_kinds_and_empty_passwords_are_refused():
    with pytest.raises(ValueError, match="'none'"):
        cram_md5_digest(Secret("server", "none", "127.0.0.1", "localhost", 1), b"x")
    with pytest.raises(ValueError):
        hashed_secret("")


@given(password=st.text(min_size=1, max_size=100), challenge=st.binary(max_size=300))
def test_a_hashed_secret_answers_like_the_password(password, challenge):
    expected = hmac.new(password.encode(), challenge, "md5").hexdigest()
    assert cram_md5_digest(plain(password), challenge) == expected
    assert cram_md5_digest(md5(hashed_secret(password)), challenge) == expected
    assert cram_md5_digest(md5(hashed_secret(password, dotted=True)), challenge) == expected


@given(chunks=st.lists(st.binary(max_size=150), max_size=6))
def test_md5_state_from_the_start_is_md5(chunks):
    state = Md5State()
    for chunk in chunks:
        state.update(chunk)
    assert state.digest() == hashlib.md5(b"".join(chunks)).digest()
    assert state.hexdigest() == hashlib.md5(b"".join(chunks)).hexdigest()


@given(blocks=st.integers(min_value=0, max_value=3), rest=st.binary(max_size=200), seed=st.binary(min_size=1))
def test_md5_state_resumes_from_saved_bytes(blocks, rest, seed):
    prefix = (seed * 256)[:64 * blocks]
    first = Md5State()
    first.update(prefix)
    resumed = Md5State.from_bytes(first.state_bytes(), length=len(prefix))
    resumed.update(rest)
    assert resumed.digest() == hashlib.md5(prefix + rest).digest()


def test_md5_state_is_saved_only_on_a_block_boundary():
    state = Md5State()
    state.update(b"x" * 65)
    with pytest.raises(ValueError):
        state.state_bytes()
    with pytest.raises(ValueError):
        Md5State(length=63)
    with pytest.raises(ValueError):
        Md5State.from_bytes(b"short")
