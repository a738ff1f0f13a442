"""Running sides: what the user asked for (inputs), implementations by name, the candidate protocol, capture."""
