"""Adds the ``S2FT`` member to PEFT's closed ``PeftType`` enum.

PEFT 0.21 can register a new method (``register_peft_method``) but refuses names that are not ``PeftType`` members and
offers no API to add one, so the member is added the way ``enum`` itself stores members.
"""

from peft.utils.peft_types import PeftType


def ensure_peft_type(name: str) -> PeftType:
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member
