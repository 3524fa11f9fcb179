"""`Diversity`: how `keras_fip.Ensemble` makes each new member differ from the ones before."""

import keras

from keras_fip.core.config import Config
from keras_fip.operations.base import Operation

LOSSES = ("error", "agreement")
ADVERSARIES = ("members", "ensemble")
# `radius="auto"`: ρ is this fraction of the range of the inputs of the ensemble's `data`.
RADIUS_FRACTION = 0.3
# `weight="auto"`: λ for inputs that can be attacked (one floating-point input).
AUTO_WEIGHT = 1.0


def _auto_or_number(value, name, low_inclusive):
    """`"auto"`, or a number > 0 (≥ 0 with `low_inclusive`)."""
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, str):
        raise ValueError(f"`{name}` must be 'auto' or a number. Received: {name}={value!r}")
    return Operation.check_number(value, name, low=0.0, low_inclusive=low_inclusive)


@keras.saving.register_keras_serializable(package="keras_fip")
class Diversity(Config):
    """The diversity term of an ensemble walk: each member trained on attacked inputs.

    `keras_fip.Ensemble` adds λ·L_div to its walk's objective, measured on inputs x̃
    attacked (L∞, radius ρ) against the ensemble as it stands:

    - `loss="error"`: L_div = CE(y, f(x̃; w)), the cross-entropy of the true label (of
      the prediction of the members so far when the ensemble's `data` has no labels).
      Each new member learns to be right where the ensemble so far is wrong: its errors
      are made negatively correlated with the ensemble's (negative-correlation learning,
      Liu & Yao 1999; ensemble adversarial training, Tramèr et al. 2018), while the
      walk's distance keeps its clean outputs.
    - `loss="agreement"`: L_div = ⟨softmax f(x̃; w), p̄_prev(x̃)⟩, the agreement with
      the mean probabilities of the members so far, its gradient normalised to length λ
      (a push away from the ensemble's answer, right or wrong).

    Where x̃ comes from (`adversary`), on `examples` inputs drawn from the ensemble's
    data per member, by FGSM with `attack_steps=1` (x̃ = clip(x + ρ·sign ∇ₓ ℓ)), else
    PGD from a uniform random start in the ρ-ball with step 2.5·ρ/`attack_steps`
    (Madry et al. 2018), on ℓ = −log p̄_y, p̄ the mean probabilities of the networks
    attacked:

    - `"members"` attacks the members taken so far (the start before the first), once
      per member: the inputs are fixed for the member's segment.
    - `"ensemble"` attacks, in every step of the walk, the ensemble the new member will
      join: the members so far (the start before the first) and the moving network
      (adversarial training of the new member against the whole ensemble). With
      `radius_ramp` > 0, ρ rises linearly from 0 over that fraction of the walk's steps.

    The attacked inputs must be one floating-point input; `weight="auto"` turns the term
    off for other inputs (token ids, several inputs).

    Args:
        weight: λ, the weight of L_div (0 turns it off), or `"auto"`: `AUTO_WEIGHT` (1)
            for one floating-point input, else 0. Defaults to `"auto"`.
        loss: `"error"` or `"agreement"`. Defaults to `"error"`.
        radius: ρ, the L∞ radius of the attacks in input units, or `"auto"`:
            `RADIUS_FRACTION` (0.3) of the range of the inputs of the ensemble's data
            (0.3 for images in [0, 1], 76.5 in [0, 255]). Defaults to `"auto"`.
        attack_steps: Steps of each attack: 1 is FGSM, more is PGD from a random start.
            Defaults to `1`.
        adversary: `"members"` or `"ensemble"` (needs `loss="error"`). Defaults to
            `"members"`.
        examples: Inputs drawn from the ensemble's data per member (attacked once with
            `"members"`, in every step with `"ensemble"`). Defaults to `2048`.
        radius_ramp: The fraction of the walk's steps over which ρ rises linearly from 0
            to `radius` (`adversary="ensemble"` only; 0: ρ from the first step).
            Defaults to `0.0`.

    Examples:

        >>> diversity = Diversity(weight=2.0, attack_steps=5)
        >>> diversity.get_config()["loss"], diversity.get_config()["attack_steps"]
        ('error', 5)
        >>> robust = Diversity(adversary="ensemble", attack_steps=3, radius_ramp=0.5)
        >>> Diversity.from_config(robust.get_config()) == robust
        True
        >>> Diversity.from_config(diversity.get_config()) == diversity
        True
        >>> Diversity(radius=0.1).resolve_radius(0.0, 255.0)
        0.1
        >>> round(Diversity().resolve_radius(0.0, 255.0), 6)
        76.5
    """

    def __init__(
        self,
        weight="auto",
        loss="error",
        radius="auto",
        attack_steps=1,
        adversary="members",
        examples=2048,
        radius_ramp=0.0,
    ):
        self.weight = _auto_or_number(weight, "weight", low_inclusive=True)
        self.loss = Operation.check_choice(loss, "loss", LOSSES)
        self.radius = _auto_or_number(radius, "radius", low_inclusive=False)
        self.attack_steps = Operation.check_number(
            attack_steps, "attack_steps", low=1, low_inclusive=True, integer=True
        )
        self.adversary = Operation.check_choice(adversary, "adversary", ADVERSARIES)
        if self.adversary == "ensemble" and self.loss != "error":
            raise ValueError(
                "`adversary='ensemble'` (inputs attacked in every step) needs "
                "`loss='error'`: the agreement needs the members' outputs on fixed inputs. "
                f"Received: adversary={adversary!r}, loss={loss!r}"
            )
        self.examples = Operation.check_number(
            examples, "examples", low=1, low_inclusive=True, integer=True
        )
        self.radius_ramp = Operation.check_number(
            radius_ramp, "radius_ramp", low=0.0, high=1.0, low_inclusive=True
        )
        if self.radius_ramp > 0 and self.adversary != "ensemble":
            raise ValueError(
                "`radius_ramp` ramps the radius of the attack made in every step, which "
                "needs `adversary='ensemble'`. "
                f"Received: radius_ramp={radius_ramp!r}, adversary={adversary!r}"
            )

    def resolve_weight(self, continuous):
        """λ: `weight`, or for `"auto"` `AUTO_WEIGHT` when `continuous` (one floating-point
        input), else 0."""
        if self.weight == "auto":
            return AUTO_WEIGHT if continuous else 0.0
        return float(self.weight)

    def resolve_radius(self, low, high):
        """ρ: `radius`, or for `"auto"` `RADIUS_FRACTION` of the inputs' range `high − low`
        (of a range of 1 when it is unknown or zero)."""
        if self.radius != "auto":
            return float(self.radius)
        span = 1.0 if low is None or high is None or high <= low else float(high - low)
        return RADIUS_FRACTION * span

    def get_config(self):
        return {
            "weight": self.weight,
            "loss": self.loss,
            "radius": self.radius,
            "attack_steps": self.attack_steps,
            "adversary": self.adversary,
            "examples": self.examples,
            "radius_ramp": self.radius_ramp,
        }

    def __hash__(self):
        return hash(tuple(sorted(self.get_config().items())))

    def __repr__(self):
        arguments = ", ".join(f"{key}={value!r}" for key, value in self.get_config().items())
        return f"Diversity({arguments})"


def get(diversity):
    """A `Diversity` from a `Diversity`, its config (or serialised form), or `None` (its
    defaults)."""
    if diversity is None:
        return Diversity()
    if isinstance(diversity, Diversity):
        return diversity
    if isinstance(diversity, dict):
        if "class_name" in diversity:
            diversity = keras.saving.deserialize_keras_object(diversity)
            if isinstance(diversity, Diversity):
                return diversity
        else:
            return Diversity.from_config(diversity)
    raise ValueError(
        "`diversity` must be a `keras_fip.operations.ensemble.Diversity`, its config or None. "
        f"Received: diversity={diversity!r}"
    )
