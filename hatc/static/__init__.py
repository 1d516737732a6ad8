"""The plain SubTransformer that export and compile consume."""
