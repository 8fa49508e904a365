"""Contracts shared by every FlexGate package, with no dependency on any of them.

Leaf modules only (standard library): the one settings object read from the environment
(`contracts.settings`), and whatever schema two packages must agree on byte for byte. Every
package may import `contracts`; `contracts` imports none of them.
"""
