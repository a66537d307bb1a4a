"""The banking check of seed 004 T42 (tests/fixtures/bank_ledger.py) on
hand-built images: every prefix of the ledger's history passes; a credit
without its debit, a deposit without its account and a withdrawal without
its deposit are each named."""
from __future__ import annotations

import random

from fixtures.bank_ledger import BLOCK, Bank, check_bank
from fixtures.volume_history import VolumeHistory

SIZE = 64 * BLOCK


def _bank(rounds: int) -> tuple[Bank, VolumeHistory]:
    imgs = {"data": bytearray(SIZE), "wal": bytearray(SIZE)}

    def write(v: str, off: int, data: bytes) -> None:
        imgs[v][off:off + len(data)] = data

    bank = Bank(write, accounts=4, customers=8)
    bank.open_accounts()
    bank.history = VolumeHistory({v: SIZE for v in imgs}, base={v: bytes(b) for v, b in imgs.items()})
    rnd = random.Random(1)
    for _ in range(rounds):
        bank.one_round(rnd)
    return bank, bank.history


def test_every_prefix_of_the_ledger_balances_and_keeps_t42():
    bank, h = _bank(30)  # customers' slots reused almost four times
    assert len(h) == 30 * 5
    for k in range(len(h) + 1):
        sample = {v: h.image(v, k) for v in ("data", "wal")}
        assert check_bank(bank, sample) == [], k
        assert h.check(sample).ok


def _with(h: VolumeHistory, k: int, extra: int) -> dict[str, bytes]:
    """Writes 0..k-1 and write *extra* (a later one) on top."""
    sample = {v: bytearray(h.image(v, k)) for v in ("data", "wal")}
    w = h.writes[extra]
    sample[w.volume][w.offset:w.offset + len(w.data)] = w.data
    return {v: bytes(b) for v, b in sample.items()}


def test_a_credit_without_its_debit_creates_money():
    bank, h = _bank(4)
    # Round 0: writes 0-2 are T42, 3 the debit, 4 the credit.
    problems = check_bank(bank, _with(h, 3, 4))
    assert len(problems) == 1 and problems[0].startswith("the bank holds $"), problems
    assert "a credit is there without its debit" in problems[0]


def test_a_deposit_without_its_account_and_a_withdrawal_without_its_deposit():
    bank, h = _bank(4)
    (p,) = check_bank(bank, _with(h, 5, 6))  # round 1: open (5) missing, deposit (6) there
    assert p.startswith("T42: the deposit of customer 1") and "without the account" in p
    (p,) = check_bank(bank, _with(h, 6, 7))  # deposit (6) missing, withdrawal (7) there
    assert p.startswith("T42: the withdrawal of customer 1") and "without the deposit" in p
