"""Image profiles: typed, validated configuration read from TOML files with inheritance."""

from imagebuilder.profile.load import available_profiles, load_profile
from imagebuilder.profile.merge import ProfileError
from imagebuilder.profile.model import Profile

__all__ = ["Profile", "ProfileError", "available_profiles", "load_profile"]
