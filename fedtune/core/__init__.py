"""Pure tensor code: the data model, codecs and factored linear algebra."""

from fedtune.core.adapters import ClientUpdate, GlobalAdapter, LoraFactors

__all__ = ["ClientUpdate", "GlobalAdapter", "LoraFactors"]
