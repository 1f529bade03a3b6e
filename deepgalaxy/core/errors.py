"""Errors that say what was wrong, with which input, and what to do."""

from __future__ import annotations


def first_few(items: list[str], n: int = 5, sep: str = ", ") -> str:
    """``"a, b, c, d, e and 3 more"``: a list short enough for a one-line message."""
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


class DeepGalaxyError(Exception):
    """Base class of every error deepgalaxy raises on purpose (the CLI prints these without a traceback)."""


class UnknownNameError(DeepGalaxyError, KeyError):
    """A model card, backbone, framework, launcher or dataset source that no plugin provides."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        import difflib

        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        listing = ", ".join(sorted(known)) if len(known) <= 30 else f"{len(known)} names (see `deepgalaxy models`)"
        super().__init__(f"unknown {kind} {name!r}.{hint} Known: {listing}.")
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(DeepGalaxyError):
    """A plugin failed to import, raised in a hook, or clashes with another plugin."""


class FrameworkUnavailableError(DeepGalaxyError):
    """A framework plugin whose library is not installed."""


class DatasetError(DeepGalaxyError):
    """A dataset store that is missing, corrupt, incomplete, or of an unsupported schema."""


class ShapeError(DeepGalaxyError, ValueError):
    """Images whose shape or channel count does not fit the model card."""


class WeightsMismatchError(DeepGalaxyError):
    """Saved weights that do not match the architecture rebuilt from the card."""


class WeightsConversionError(DeepGalaxyError):
    """Weights trained in one framework that cannot be converted for another. Nothing says the weights are wrong
    (unlike :class:`WeightsMismatchError`): converting them is not available for their backbone.

    ``problem`` says what could not be converted; ``trained_with`` is the framework to load them in; ``call`` is the
    ``registry.load`` arguments that name the model, when the loader knows them.
    """

    def __init__(self, problem: str, trained_with: str, call: str = "") -> None:
        super().__init__(problem, trained_with, call)  # the arguments, so the error pickles whole
        self.problem, self.trained_with = problem, trained_with
        how = f"registry.load({call}, framework={trained_with!r})" if call else f"framework={trained_with!r}"
        self.message = (f"{problem}. Load it in the framework that trained it: {how} "
                        f"(at the CLI: --framework {trained_with})")

    def __str__(self) -> str:
        return self.message

    def loading(self, call: str) -> WeightsConversionError:
        """The same error, naming the model in its remedy: ``call`` is e.g. ``"'clf', version=2"``."""
        return WeightsConversionError(self.problem, self.trained_with, call)


class ModelNotFoundError(DeepGalaxyError):
    """No registered version (or alias) of a model in the tracking server."""


class TrainingError(DeepGalaxyError):
    """Training cannot go on (a NaN loss, a worker that died)."""


class ModelFileError(WeightsMismatchError):
    """A saved model's ``card.json`` or ``weights.safetensors`` that cannot be read or holds unusable values
    (not a safetensors file, a card with wrong or extra fields, NaN or infinite weights)."""


class PluginWarning(UserWarning):
    """A plugin setting that is accepted but probably not what was meant (an allow-list naming no plugin)."""


class DeviceError(DeepGalaxyError, ValueError):
    """A device or precision that does not exist here: an unknown name, a GPU index beyond those visible, fp16 on a
    CPU, or a batch that does not fit in the device's memory."""
