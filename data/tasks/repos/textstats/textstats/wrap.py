"""Greedy text wrapping."""


def wrap(text, width=70):
    """Wrap *text* into lines of at most *width* characters.

    Words are separated by single spaces; whitespace in *text* is collapsed.
    A word longer than *width* is split into chunks of *width* characters,
    starting on a fresh line. Returns a list of lines ([] for blank text).
    """
    if width < 1:
        raise ValueError("width must be at least 1")
    lines = []
    current = ""
    for word in text.split():
        while len(word) > width:
            if current:
                lines.append(current)
                current = ""
            lines.append(word[:width])
            word = word[width:]
        if not current:
            current = word
        elif len(current) + 1 + len(word) <= width:
            current += " " + word
        else:
            lines.append(current)
            current = word
    if current:
        lines.append(current)
    return lines


def fill(text, width=70, indent=""):
    """Wrap *text* and join the lines with newlines, prefixing each with *indent*.

    The indent counts towards *width*.
    """
    if len(indent) >= width:
        raise ValueError("indent must be shorter than width")
    return "\n".join(indent + line for line in wrap(text, width - len(indent)))
