"""Your own data and network from the command line, with no Domain class: ``domain=custom`` (docs/own_model.md)."""

from domains.custom.domain import CustomDomain, UserNetworkScore, file_pairs, load_tensor_file, make_domain

__all__ = ["CustomDomain", "UserNetworkScore", "file_pairs", "load_tensor_file", "make_domain"]
