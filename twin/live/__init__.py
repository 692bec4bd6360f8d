"""The living twin (issue 14): readings coming in, rules and detectors, events and their
escalation, and the push of every change to the maps. A library over the floor and the
queries; the API starts its background work through ``runtime``."""
