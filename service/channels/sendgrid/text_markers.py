"""What mail clients write around quoted history, per language: data only, matched with plain
string operations (no regular expressions), so every lookup is linear in the line.

Languages: en, fr, de, es, it, nl, pt, sv, da, no, pl, ru, ja, vi, plus the fi, cs, hu, tr and zh
forms seen in the public reply-parser fixtures. Everything is lower-case.
"""

from __future__ import annotations

# The last word of an attribution line ("On … Bob wrote:"), once the trailing colon is gone.
WROTE_WORDS: frozenset[str] = frozenset(
    {
        "wrote",  # en
        "writes",
        "sent",
        "écrit",  # fr "a écrit"
        "ecrit",
        "schrieb",  # de
        "geschrieben",
        "escribió",  # es
        "escribio",
        "scritto",  # it "ha scritto"
        "scrisse",
        "schreef",  # nl
        "geschreven",  # nl "heeft … het volgende geschreven"
        "escreveu",  # pt
        "skrev",  # sv, da, no
        "napisał",  # pl
        "napisała",
        "napisał(a)",
        "napisal",
        "написал",  # ru
        "написала",
        "написал(а)",
        "пишет",
        "viết",  # vi "đã viết"
        "kirjoitti",  # fi
        "írta",  # hu
        "napsal",  # cs
        "napsala",
        "napsal(a)",
        "yazdı",  # tr
    }
)
# Japanese and Chinese attributions end without a space before the verb.
WROTE_CJK_ENDINGS: tuple[str, ...] = ("写道", "のメッセージ", "のメール", "書きました")

# The first word of an attribution; a header wrapped over two or three lines must begin so.
# (A date, "-" or "*" also do; "W dniu" is the one two-word start.)
HEADER_START_WORDS: frozenset[str] = frozenset(
    {
        "on",  # en
        "le",  # fr
        "am",  # de
        "el",  # es
        "il",  # it
        "op",  # nl
        "em",  # pt
        "den",  # sv, da, no
        "på",  # no
        "dnia",  # pl
        "dne",  # cs
        "в",  # ru
        "vào",  # vi
        # weekday abbreviations Gmail puts first (en fr es it pt pl ru da no sv fi vi)
        *("mon", "tue", "wed", "thu", "fri", "sat", "sun"),
        *("lun", "mar", "mer", "jeu", "ven", "sam", "dim", "mié", "jue", "vie", "sáb", "dom"),
        *("gio", "seg", "ter", "qua", "qui", "sex", "pon", "wt", "śr", "czw", "pt", "sob", "ndz"),
        *("пн", "вт", "ср", "чт", "пт", "сб", "вс"),
        *("ma", "ti", "to", "fr", "lø", "sø", "man", "tir", "ons", "tor", "fre", "lör", "sön"),
        *("pe", "th"),
    }
)

# "-----Original Message-----" and its translations (the dashes and colons are stripped first).
ORIGINAL_MESSAGE: frozenset[str] = frozenset(
    {
        "original message",
        "reply message",
        "original",
        "ursprüngliche nachricht",
        "ursprungliche nachricht",
        "antwort nachricht",
        "originalnachricht",
        "oprindelig meddelelse",
        "oprindelig besked",
        "message d'origine",
        "message d’origine",
        "message original",
        "mensaje original",
        "messaggio originale",
        "oorspronkelijk bericht",
        "origineel bericht",
        "mensagem original",
        "ursprungligt meddelande",
        "originalmeddelande",
        "opprinnelig melding",
        "oryginalna wiadomość",
        "wiadomość oryginalna",
        "исходное сообщение",
        "původní zpráva",
        "alkuperäinen viesti",
        "eredeti üzenet",
        "原始邮件",
        "元のメッセージ",
        "thư gốc",
        "tin nhắn gốc",
    }
)

# Lines that introduce a forwarded message (kept: the person sent it to be read).
FORWARDED: frozenset[str] = frozenset(
    {
        "forwarded message",
        "forwarded message follows",
        "begin forwarded message",
        "original forwarded message",
        "message transféré",
        "message transfere",
        "début du message réexpédié",
        "début du message transféré",
        "message réexpédié",
        "weitergeleitete nachricht",
        "anfang der weitergeleiteten nachricht",
        "mensaje reenviado",
        "inicio del mensaje reenviado",
        "comienzo del mensaje reenviado",
        "messaggio inoltrato",
        "inizio messaggio inoltrato",
        "doorgestuurd bericht",
        "begin doorgestuurd bericht",
        "doorgestuurd bericht begint",
        "mensagem encaminhada",
        "início da mensagem encaminhada",
        "inicio da mensagem encaminhada",
        "mensagem reencaminhada",
        "vidarebefordrat meddelande",
        "vidarebefordrat brev",
        "videresendt meddelelse",
        "videresendt besked",
        "videresendt melding",
        "przekazana wiadomość",
        "wiadomość przekazana",
        "пересылаемое сообщение",
        "пересланное сообщение",
        "転送されたメッセージ",
        "転送メッセージ",
        "thư được chuyển tiếp",
        "tin nhắn được chuyển tiếp",
        "välitetty viesti",
        "továbbított üzenet",
        "přeposlaná zpráva",
    }
)

# Header labels of an Outlook-style block ("From: … Sent: … To: … Subject: …").
FROM_LABELS: frozenset[str] = frozenset(
    {
        "from",
        "de",
        "von",
        "da",
        "van",
        "fra",
        "från",
        "od",
        "от",
        "lähettäjä",
        "feladó",
        "差出人",
        "送信者",
        "từ",
        "发件人",
        "date",
        "sent",
    }
)
OTHER_LABELS: frozenset[str] = frozenset(
    {
        "sent",
        "date",
        "to",
        "cc",
        "subject",
        "reply-to",
        "envoyé",
        "envoye",
        "à",
        "a",
        "objet",
        "cc ",
        "gesendet",
        "datum",
        "an",
        "betreff",
        "enviado",
        "enviada",
        "enviado el",
        "enviada em",
        "enviado em",
        "fecha",
        "para",
        "asunto",
        "assunto",
        "data",
        "inviato",
        "oggetto",
        "verzonden",
        "verstuurd",
        "aan",
        "onderwerp",
        "sendt",
        "dato",
        "til",
        "emne",
        "skickat",
        "till",
        "ämne",
        "wysłano",
        "wysłane",
        "do",
        "temat",
        "отправлено",
        "дата",
        "кому",
        "тема",
        "копия",
        "lähetetty",
        "vastaanottaja",
        "aihe",
        "elküldve",
        "címzett",
        "tárgy",
        "送信日時",
        "宛先",
        "件名",
        "日付",
        "đã gửi",
        "ngày",
        "đến",
        "chủ đề",
        "发送时间",
        "收件人",
        "主题",
    }
)

# "Sent from my iPhone" and the like: a footer when it ends the text (lower-case prefixes).
MOBILE_FOOTERS: tuple[str, ...] = (
    "sent from my ",
    "sent from outlook",
    "sent from yahoo mail",
    "sent from mail for windows",
    "sent from samsung",
    "sent from the all new aol app",
    "sent from proton mail",
    "sent from gmail mobile",
    "sent via ",
    "sent with ",
    "get outlook for ",
    "download outlook for ",
    "envoyé de mon ",
    "envoyé depuis ",
    "envoyé à partir de ",
    "télécharger outlook pour ",
    "obtenir outlook pour ",
    "von meinem ",
    "gesendet von meinem ",
    "gesendet vom ",
    "gesendet mit ",
    "outlook für ",
    "enviado desde mi ",
    "enviado desde ",
    "enviado do meu ",
    "enviado de meu ",
    "enviado do ",
    "obter o outlook para ",
    "obtener outlook para ",
    "inviato da ",
    "inviato dal mio ",
    "scarica outlook per ",
    "verzonden met ",
    "verzonden vanaf mijn ",
    "verstuurd vanaf mijn ",
    "verstuurd met ",
    "skickat från min ",
    "skickat från ",
    "sendt fra min ",
    "sendt fra ",
    "wysłane z ",
    "wysłano z ",
    "отправлено с ",
    "отправлено из ",
    "gửi từ ",
    "được gửi từ ",
    "lähetetty ",
)
MOBILE_FOOTER_ENDINGS: tuple[str, ...] = ("から送信", "gesendet")

# Lines that close a message ("Best regards,"): punctuation and case are ignored.
CLOSINGS: frozenset[str] = frozenset(
    {
        "thanks",
        "thank you",
        "thanks again",
        "many thanks",
        "thanks in advance",
        "thanks a lot",
        "thank you very much",
        "thx",
        "ty",
        "cheers",
        "best",
        "all best",
        "all the best",
        "best regards",
        "kind regards",
        "kindest regards",
        "warm regards",
        "warmest regards",
        "regards",
        "best wishes",
        "with best wishes",
        "sincerely",
        "yours sincerely",
        "sincerely yours",
        "yours truly",
        "yours",
        "br",
        "rgds",
        "take care",
        "talk soon",
        "cordialement",
        "bien cordialement",
        "bien à vous",
        "merci",
        "merci beaucoup",
        "merci d'avance",
        "amitiés",
        "salutations",
        "bonne journée",
        "à bientôt",
        "mit freundlichen grüßen",
        "mit freundlichen grüssen",
        "freundliche grüße",
        "freundliche grüsse",
        "viele grüße",
        "viele grüsse",
        "beste grüße",
        "liebe grüße",
        "herzliche grüße",
        "schöne grüße",
        "grüße",
        "gruß",
        "lg",
        "vg",
        "mfg",
        "danke",
        "vielen dank",
        "saludos",
        "un saludo",
        "saludos cordiales",
        "atentamente",
        "cordialmente",
        "gracias",
        "muchas gracias",
        "saluti",
        "cordiali saluti",
        "distinti saluti",
        "un saluto",
        "grazie",
        "grazie mille",
        "met vriendelijke groet",
        "met vriendelijke groeten",
        "vriendelijke groet",
        "vriendelijke groeten",
        "hartelijke groet",
        "groetjes",
        "groeten",
        "groet",
        "bedankt",
        "atenciosamente",
        "abraços",
        "abraço",
        "obrigado",
        "obrigada",
        "cumprimentos",
        "melhores cumprimentos",
        "med vänlig hälsning",
        "med vänliga hälsningar",
        "vänliga hälsningar",
        "vänlig hälsning",
        "hälsningar",
        "mvh",
        "tack",
        "med venlig hilsen",
        "venlig hilsen",
        "de bedste hilsner",
        "hilsen",
        "mange tak",
        "med vennlig hilsen",
        "vennlig hilsen",
        "beste hilsen",
        "pozdrawiam",
        "z poważaniem",
        "pozdrowienia",
        "serdecznie pozdrawiam",
        "dziękuję",
        "с уважением",
        "спасибо",
        "всего доброго",
        "trân trọng",
        "thân ái",
        "cảm ơn",
        "ystävällisin terveisin",
        "terveisin",
        "s pozdravem",
        "üdvözlettel",
    }
)
