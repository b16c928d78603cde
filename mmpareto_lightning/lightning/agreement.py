"""What DDP ranks agree on before each step's communicating backward: the encoders and objectives they
integrate, and whether every encoder was called (plain ``ddp`` needs it)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from mmpareto_lightning.distributed import HostExchange

__all__ = ["RankAgreement"]


class RankAgreement:
    """The ranks' agreement on what they integrate, through host exchanges (:class:`HostExchange`).

    Build it on every rank at the same point (it may make a gloo group: a collective), e.g. when the fit
    starts.

    Args:
        every_encoder_needed: DDP without ``find_unused_parameters``: an encoder not called on some rank
            makes DDP's all-reduce abort (or hang), so every rank refuses the step first.
    """

    def __init__(self, every_encoder_needed: bool) -> None:
        self.every_encoder_needed = every_encoder_needed
        self.exchange = HostExchange()

    def __call__(self, objectives: dict[str, list[str]], absent: list[str]) -> dict[str, list[str]]:
        """What every rank integrates this step: the union of the ranks' objectives per encoder.

        One exchange of host values (:meth:`HostExchange.differing`: two integers when the ranks agree,
        which is the common case). Every rank reaches the same answer, so a refusal is raised on all of
        them and none is left waiting in DDP's all-reduce.
        """
        mine = (tuple((enc, tuple(names)) for enc, names in objectives.items()), tuple(absent))
        gathered = self.exchange.differing(mine)
        everyone = [mine] if gathered is None else gathered
        if self.every_encoder_needed and any(a for _, a in everyone):
            where = (
                f"on every rank ({sorted(absent)})"
                if gathered is None
                else ", ".join(f"{sorted(a)} on rank {r}" for r, (_, a) in enumerate(everyone) if a)
            )
            raise MisconfigurationException(
                f"An encoder was not called in this step (a missing modality): {where}. DDP with "
                "`find_unused_parameters=False` needs a gradient for every parameter on every rank and "
                "would abort (or hang) in its all-reduce. Use `strategy='ddp_find_unused_parameters_true'` "
                "(or `DDPStrategy(find_unused_parameters=True)`): MMPareto then integrates the ranks' "
                "average gradients, to which a rank without the modality contributes zeros."
            )
        union: dict[str, list[str]] = {}
        for encoders, _ in everyone:
            for enc, names in encoders:
                merged = union.setdefault(enc, [])
                merged.extend(n for n in names if n not in merged)
        return union

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        return self.exchange.gather(value)

    def close(self) -> None:
        self.exchange.close()
