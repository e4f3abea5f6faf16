"""lorakit verify's server stage against a real running server (issue 12): the served adapter's
greedy answers equal base + adapter's; a server answering with another adapter fails the stage."""

from __future__ import annotations

from server_setup import API_KEY

from lorakit.cli import main


def _verify(capsys, tiny_server, adapter: str, served_as: str) -> tuple[int, str]:
    code = main(["verify", "--adapter", str(tiny_server.dirs[adapter]), "--server", tiny_server.url,
                 "--server-model", served_as, "--api-key", API_KEY, "--prompts", "2", "--max-new-tokens", "8"])
    return code, capsys.readouterr().out


def test_server_stage_agrees_with_the_adapter(tiny_server, capsys):
    code, out = _verify(capsys, tiny_server, "t1", "t1")
    assert code == 0, out
    row = next(line for line in out.splitlines() if line.startswith("server"))
    assert "2/2" in row and row.endswith("ok")


def test_server_stage_fails_when_the_server_serves_another_adapter(tiny_server, capsys):
    code, out = _verify(capsys, tiny_server, "t1", "t2")
    assert code == 1 and "FAILED at server" in out
