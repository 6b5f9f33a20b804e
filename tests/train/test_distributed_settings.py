"""The coordinator's address of a multi-process run: checked before JAX is asked to start.

No process is started here (tests/train/test_multiprocess.py trains with two): a bad address
must be refused, in one line naming it and why, before `jax.distributed.initialize`.
"""

import socket

import jax
import pytest
from conftest import REPO_ROOT, load_script

from mmdrfuse_jax.train import distributed


@pytest.fixture
def no_jax_start(monkeypatch):
  """Fails the test if JAX is asked to start a distributed run."""
  def started(**kwargs):
    raise AssertionError(f"jax.distributed.initialize was called with {kwargs}")

  monkeypatch.setattr(jax.distributed, "initialize", started)


@pytest.mark.parametrize("address, why", [
    ("not_a_host", "not a HOST:PORT address (no port)"),
    ("host:", "not a HOST:PORT address (no port)"),
    (":1234", "not a HOST:PORT address (no host)"),
    ("host:http", "the port 'http' is not a number"),
    ("host:0", "the port 0 is not in 1..65535"),
    ("host:70000", "the port 70000 is not in 1..65535"),
    ("[::1:1234", "not a HOST:PORT address (an IPv6 host is written [ADDRESS]:PORT)"),
    ("::1:1234", "not a HOST:PORT address (an IPv6 host is written [ADDRESS]:PORT)"),
])
def test_unusable_coordinator_address(address, why):
  # The reported case: `--coordinator_address=not_a_host` ended in "IndexError: list index out
  # of range" from inside JAX.
  with pytest.raises(distributed.UsageError) as info:
    distributed.settings(coordinator_address=address, num_processes=2, process_id=0)
  assert str(info.value) == f"--coordinator_address {address!r}: {why}"
  with pytest.raises(distributed.UsageError) as info:
    distributed.settings(environ={"JAX_COORDINATOR_ADDRESS": address})
  assert str(info.value) == f"$JAX_COORDINATOR_ADDRESS {address!r}: {why}"


@pytest.mark.parametrize("address", ["h:1", "localhost:1234", "10.0.0.1:65535", "[::1]:8476",
                                     "node-1.cluster.example:1234"])
def test_usable_coordinator_address(address):
  assert distributed.settings(coordinator_address=address, num_processes=2, process_id=1) == dict(
      coordinator_address=address, num_processes=2, process_id=1)


def _no_such_host(code):
  def getaddrinfo(host, port, *args, **kwargs):
    raise socket.gaierror(code, "Name or service not known" if code == socket.EAI_NONAME
                          else "Temporary failure in name resolution")
  return getaddrinfo


def test_unknown_coordinator_host_is_refused_before_jax_starts(monkeypatch, no_jax_start):
  monkeypatch.setattr(socket, "getaddrinfo", _no_such_host(socket.EAI_NONAME))
  with pytest.raises(distributed.UsageError) as info:
    distributed.initialize("auto", "nohost.invalid:1234", 2, 1)
  assert str(info.value) == ("--coordinator_address 'nohost.invalid:1234': cannot resolve the "
                             "host 'nohost.invalid' (name or service not known)")
  # A name service that does not answer now is a failure at run time, not a wrong setting.
  monkeypatch.setattr(socket, "getaddrinfo", _no_such_host(socket.EAI_AGAIN))
  with pytest.raises(distributed.DistributedError) as info:
    distributed.initialize("auto", "nohost.invalid:1234", 2, 1)
  assert not isinstance(info.value, distributed.UsageError)
  assert str(info.value) == ("--coordinator_address 'nohost.invalid:1234': cannot resolve the "
                             "host 'nohost.invalid' (temporary failure in name resolution)")


def test_cli_names_the_bad_address_in_one_line(tmp_path, capsys, no_jax_start):
  code = load_script("train").main([
      f"--config={REPO_ROOT / 'configs' / 'quickstart.py'}", f"--workdir={tmp_path / 'run'}",
      "--coordinator_address=not_a_host", "--num_processes=2", "--process_id=0"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert err == ("error: --coordinator_address 'not_a_host': not a HOST:PORT address "
                 "(no port)\n")
  assert not (tmp_path / "run").exists()
