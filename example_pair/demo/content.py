"""The demo's content: a few countries, their languages and the site's texts in each."""

from __future__ import annotations

COUNTRIES = {
    "fr": "France",
    "de": "Deutschland",
    "es": "España",
    "it": "Italia",
    "gr": "Ελλάδα",
}

#: (country code, language code, language name)
LANGUAGES = [
    ("fr", "fr", "Français"),
    ("de", "de", "Deutsch"),
    ("es", "es", "Español"),
    ("es", "ca", "Català"),
    ("it", "it", "Italiano"),
    ("gr", "el", "Ελληνικά"),
]

#: key -> language code -> text
COPIES = {
    "welcome": {
        "fr": "Bienvenue !",
        "de": "Willkommen!",
        "es": "¡Bienvenido!",
        "ca": "Benvingut!",
        "it": "Benvenuto!",
        "el": "Καλώς ήρθατε!",
    },
    "goodbye": {
        "fr": "Au revoir",
        "de": "Auf Wiedersehen",
        "es": "Adiós",
        "ca": "Adéu",
        "it": "Arrivederci",
        "el": "Αντίο",
    },
    "cart.checkout": {
        "fr": "Commander",
        "de": "Zur Kasse",
        "es": "Pagar",
        "ca": "Pagar",
        "it": "Vai alla cassa",
        "el": "Ταμείο",
    },
    "cart.empty": {
        "fr": "Votre panier est vide",
        "de": "Ihr Warenkorb ist leer",
        "es": "Tu carrito está vacío",
        "ca": "La teva cistella és buida",
        "it": "Il carrello è vuoto",
        "el": "Το καλάθι σας είναι άδειο",
    },
    "search.placeholder": {
        "fr": "Rechercher…",
        "de": "Suchen…",
        "es": "Buscar…",
        "ca": "Cercar…",
        "it": "Cerca…",
        "el": "Αναζήτηση…",
    },
}

#: Thumbnail colour per country (the welcome copies get a small PNG each).
COLOURS = {
    "fr": (0, 85, 164),
    "de": (221, 0, 0),
    "es": (241, 191, 0),
    "it": (0, 146, 70),
    "gr": (13, 94, 175),
}
