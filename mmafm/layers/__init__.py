"""Building blocks shared by the vision and text towers (torchtitan's ``models/common``)."""
