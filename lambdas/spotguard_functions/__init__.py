"""spotguard package."""
