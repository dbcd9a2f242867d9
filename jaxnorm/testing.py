"""Helpers for testing code that uses jaxnorm."""

from jaxnorm._src.compile_counter import CompileLog as CompileLog
from jaxnorm._src.compile_counter import count_compiles as count_compiles
