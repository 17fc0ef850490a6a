"""genreg's methods, one module each: a config dataclass, the method's math as plain functions, and its runner."""
