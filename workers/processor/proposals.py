"""The proposals the decision engine has made, and what became of each.

The engine re-finds an opportunity at every analysis interval while it lasts; the book keeps
one entry per proposal id, so that it is announced once (``new``) and afterwards only its
figures are refreshed. Its status says what happened to it: ``open`` (proposed), ``deploying``
(a canary rollout runs), ``promoted``, ``rolled_back``, ``dismissed`` (by an operator) or
``failed`` (it could not be rolled out, e.g. an invalid change).
"""
from __future__ import annotations

from typing import Literal

import msgspec

from workers.processor.strategies.proposal import Proposal

Status = Literal["open", "deploying", "promoted", "rolled_back", "dismissed", "failed"]


class Entry(msgspec.Struct):
    proposal: Proposal
    status: Status = "open"
    status_detail: str = ""
    first_ns: int = 0   # event time it was first proposed
    updated_ns: int = 0

    def to_dict(self) -> dict:
        return {**self.proposal.to_dict(), "status": self.status,
                "status_detail": self.status_detail, "first_ns": self.first_ns,
                "updated_ns": self.updated_ns}


class UnknownProposal(LookupError):
    def __init__(self, proposal_id: str):
        super().__init__(f"no proposal {proposal_id!r}")
        self.proposal_id = proposal_id


class ProposalBook:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def update(self, proposals: list[Proposal], now_ns: int) -> tuple[list[Entry], list[Entry]]:
        """(new entries, refreshed open entries). Proposals whose entry is no longer open
        (deployed, rolled back, dismissed) are not reopened by being found again."""
        new, refreshed = [], []
        for proposal in proposals:
            entry = self.entries.get(proposal.id)
            if entry is None:
                entry = self.entries[proposal.id] = Entry(proposal, first_ns=now_ns,
                                                          updated_ns=now_ns)
                new.append(entry)
            elif entry.status == "open" and entry.proposal != proposal:
                entry.proposal, entry.updated_ns = proposal, now_ns
                refreshed.append(entry)
        return new, refreshed

    def next_to_deploy(self, busy: set[str]) -> list[Entry]:
        """For auto-deploy: per service without a rollout, its best open proposal, those with
        direct evidence first, then by savings."""
        best: dict[str, Entry] = {}
        for entry in self.entries.values():
            service = entry.proposal.service
            if entry.status != "open" or service in busy:
                continue
            if service not in best or _rank(entry) < _rank(best[service]):
                best[service] = entry
        return [best[service] for service in sorted(best)]

    def get(self, proposal_id: str) -> Entry:
        entry = self.entries.get(proposal_id)
        if entry is None:
            raise UnknownProposal(proposal_id)
        return entry

    def set_status(self, proposal_id: str, status: Status, detail: str, now_ns: int) -> Entry:
        entry = self.get(proposal_id)
        entry.status, entry.status_detail, entry.updated_ns = status, detail, now_ns
        return entry

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(list(self.entries.values()))

    @classmethod
    def from_bytes(cls, data: bytes) -> ProposalBook:
        book = cls()
        for entry in msgspec.msgpack.decode(data, type=list[Entry]):
            book.entries[entry.proposal.id] = entry
        return book


def _rank(entry: Entry) -> tuple[bool, float, str]:
    proposal = entry.proposal
    return (proposal.needs_experiment, -proposal.expected_impact.savings_usd_per_day,
            proposal.id)
