"""A griffe extension for the docs: a class attribute documented only in its
class's Google-style ``Attributes:`` section gets that text as its docstring.

mkdocstrings renders only members that have a docstring, so an attribute
described in the class docstring (``ForkAware.managed``) would not appear on
the classes that inherit it (every pool). Listed in mkdocs.yml.
"""

from __future__ import annotations

from typing import Any

import griffe


class AttributeSections(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        if cls.docstring is None:
            return
        sections = griffe.parse_google(cls.docstring, warnings=False)
        for section in sections:
            if section.kind is not griffe.DocstringSectionKind.attributes:
                continue
            for item in section.value:
                member = cls.members.get(item.name)
                if isinstance(member, griffe.Attribute) and member.docstring is None:
                    member.docstring = griffe.Docstring(
                        item.description, parent=member, lineno=cls.docstring.lineno
                    )
