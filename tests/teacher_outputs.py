"""Hand-written teacher outputs, good and bad, each labelled with the rule that must reject it (None: keep).

Written by hand in the grid's output contract, the way strong and weak teachers actually answer: the good ones vary
in wording, length and task; the bad ones carry one defect each (a loop, CJK or Cyrillic inside a term, a broken,
nested or duplicated tag, a cut-off reply, a wrong or impossible MCQ letter, an answer that misses the diagnosis, a
copy of an earlier output, a reply too short to teach anything).
"""

from __future__ import annotations

OPT4 = "<options>\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n</options>"


def mcq(question, options, think, answer):
    block = "<options>\n" + "\n".join(f"{k}. {v}" for k, v in zip("ABCDEF", options, strict=False)) + "\n</options>"
    return f"<question>{question}</question>\n{block}\n<think>{think}</think>\n<answer>{answer}</answer>"


def single(question, think, answer):
    return f"<question>{question}</question>\n<think>{think}</think>\n<answer>{answer}</answer>"


def turns(*qta):
    return "\n".join(single(q, t, a) for q, t, a in qta)


GOOD = [
    dict(id="g01", task="mcq", subfield="histopathology", gold="Tubular adenoma", response=mcq(
        "A polypoid colonic lesion is shown at low power. Which diagnosis fits best?",
        ["Hyperplastic polyp", "Tubular adenoma", "Invasive adenocarcinoma", "Juvenile polyp"],
        "The crypts are elongated and lined by pencillate, hyperchromatic nuclei that reach the surface, and there is "
        "no serration. The lamina propria is intact and no desmoplastic stroma is seen, so invasion is not shown.",
        "B")),
    dict(id="g02", task="mcq", subfield="ihc", gold="C", response=mcq(
        "The tumour cells show strong nuclear staining in this immunostain. Which marker pattern is this most likely?",
        ["Cytokeratin 7 membranous", "Synaptophysin cytoplasmic", "TTF-1 nuclear", "CD45 membranous"],
        "Staining is confined to the nuclei of the tumour cells, with crisp, uniform intensity and negative stroma. Of "
        "the options, only TTF-1 is a nuclear transcription factor; the others stain cytoplasm or membranes.",
        "C")),
    dict(id="g03", task="mcq", subfield="cytology", gold="Papillary thyroid carcinoma", response=mcq(
        "Fine-needle aspirate of a thyroid nodule. What is the most likely diagnosis?",
        ["Nodular goitre", "Papillary thyroid carcinoma", "Follicular adenoma", "Hashimoto thyroiditis",
         "Medullary carcinoma"],
        "Sheets of cells with enlarged, oval nuclei show powdery chromatin, nuclear grooves and intranuclear "
        "pseudoinclusions. Colloid is scant and ropy. These nuclear features define papillary carcinoma.",
        "B")),
    dict(id="g04", task="mcq", subfield="gross", gold="Leiomyoma", response=mcq(
        "The sectioned uterine mass is well circumscribed with a whorled, white cut surface. What is it?",
        ["Leiomyosarcoma", "Adenomyosis", "Leiomyoma", "Endometrial stromal sarcoma"],
        "A sharply demarcated, bulging mass with a whorled, trabeculated white surface and no haemorrhage or necrosis "
        "is the classic gross appearance of a leiomyoma; sarcoma would be soft, fleshy and necrotic.",
        "C")),
    dict(id="g05", task="mcq", subfield="fish", gold="HER2 amplification", response=mcq(
        "Dual-probe FISH on a breast carcinoma. What does the signal pattern show?",
        ["HER2 amplification", "Chromosome 17 polysomy", "Normal HER2 status", "HER2 deletion"],
        "Most nuclei hold clusters of red HER2 signals far outnumbering the two green CEP17 signals, giving a ratio "
        "well above 2.0, which is amplification rather than polysomy.",
        "A")),
    dict(id="g06", task="mcq", subfield="histopathology", gold="Squamous cell carcinoma", response=mcq(
        "Which diagnosis best fits this lung biopsy?",
        ["Adenocarcinoma", "Small cell carcinoma", "Squamous cell carcinoma", "Carcinoid tumour"],
        "Nests of polygonal cells with eosinophilic cytoplasm show intercellular bridges and a keratin pearl. There is "
        "no gland formation and the nuclei are not moulded, which argues against adenocarcinoma and small cell "
        "carcinoma.", "C. Squamous cell carcinoma")),
    dict(id="g07", task="mcq", subfield="histopathology", gold="Granuloma", response=mcq(
        "A lymph node shows the structure seen here. What is it?",
        ["Germinal centre", "Granuloma", "Metastatic carcinoma", "Sinus histiocytosis"],
        "There is a tight aggregate of epithelioid histiocytes with elongated nuclei and a Langhans giant cell, rimmed "
        "by lymphocytes.", "(B)")),
    dict(id="g08", task="mcq", subfield="ihc", gold="Ki-67", response=mcq(
        "Which stain highlights proliferating nuclei in this lymphoma?",
        ["CD20", "Ki-67", "BCL2", "CD3", "Cyclin D1", "CD10"],
        "A stain that marks nuclei in cycling cells, with a high proportion positive in an aggressive lymphoma, is a "
        "proliferation marker; CD20, CD3 and CD10 are membranous, BCL2 cytoplasmic.", "B")),
    dict(id="g09", task="description", subfield="histopathology", gold="chronic gastritis", response=single(
        "Describe this gastric biopsy in detail.",
        "Start with the mucosa and glands, then the lamina propria infiltrate, then look for organisms and intestinal "
        "metaplasia.",
        "The antral mucosa shows preserved foveolar architecture. The lamina propria is expanded by plasma cells and "
        "lymphocytes with a lymphoid follicle. No neutrophils, metaplasia or dysplasia are seen. The "
            "appearance is that "
        "of chronic gastritis.")),
    dict(id="g10", task="description", subfield="gross", gold="renal cell carcinoma", response=single(
        "Describe the specimen.",
        "Assess the organ, the lesion's location, size, colour, borders and the renal vein and sinus.",
        "A nephrectomy specimen contains a 6 cm, well-circumscribed mass at the upper pole with a variegated golden "
        "yellow cut surface, areas of haemorrhage and cystic change. The renal sinus fat is not involved. "
            "These are the "
        "gross features of clear cell renal cell carcinoma.")),
    dict(id="g11", task="description", subfield="cytology", gold="adenocarcinoma", response=single(
        "Give a detailed description of this pleural fluid preparation.",
        "Judge cellularity, background, the second population of cells, and their nuclear features.",
        "The fluid is cellular, with mesothelial cells, histiocytes and a separate population of three-dimensional "
        "clusters with vacuolated cytoplasm, eccentric nuclei and prominent nucleoli. The findings indicate metastatic "
        "adenocarcinoma.")),
    dict(id="g12", task="description", subfield="ihc", gold="p16 block positivity", response=single(
        "Describe the staining in this cervical biopsy.",
        "Look at the distribution of staining within the epithelium, the compartments stained and its intensity.",
        "There is strong, continuous nuclear and cytoplasmic staining of the basal and parabasal cells "
            "extending to the "
        "upper third of the epithelium, diagnostic of p16 block positivity, supporting a high-grade squamous lesion.")),
    dict(id="g13", task="description", subfield="fish", gold="ALK rearrangement", response=single(
        "Describe the FISH result in detail.",
        "Count fused and split signals in at least fifty nuclei with a break-apart probe.",
        "Many nuclei show one fused signal with separate red and green signals more than two signal diameters apart, "
        "above the cut-off of 15% of nuclei. The pattern indicates ALK rearrangement.")),
    dict(id="g14", task="description", subfield="histopathology", gold="adipose tissue", response=single(
        "Describe the tissue.",
        "Examine the cells, the spaces, the septa and the nuclei.",
        "Large, uniform empty vacuoles are separated by thin pink septa with flattened peripheral nuclei. There is no "
        "atypia or lipoblast. This is mature adipose tissue.")),
    dict(id="g15", task="reasoning", subfield="histopathology", gold="Hashimoto thyroiditis", response=single(
        "What is the diagnosis, and which finding excludes a lymphoma?",
        "The thyroid follicles are atrophic and lined by Hurthle cells, and a dense lymphoplasmacytic infiltrate with "
        "germinal centres surrounds them. Germinal centres and a mixed infiltrate point to a reactive process; a "
        "lymphoma would efface the gland with a monotonous population and lymphoepithelial lesions.",
        "Hashimoto thyroiditis; the mixed infiltrate with reactive germinal centres argues against lymphoma.")),
    dict(id="g16", task="reasoning", subfield="gross", gold="infarct", response=single(
        "Why is the lesion wedge-shaped, and what is it?",
        "The lesion is pale, wedge-shaped, with its base on the capsule and apex toward the hilum. That geometry "
        "follows the territory of an end artery, so an arterial occlusion is the cause.",
        "A pale (anaemic) infarct of the spleen, following an arterial branch.")),
    dict(id="g17", task="reasoning", subfield="cytology", gold="small cell carcinoma", response=single(
        "Which features separate these cells from a lymphoma?",
        "The cells are small with scant cytoplasm, but the nuclei mould against each other, the chromatin is finely "
        "granular, crush artefact is prominent and nucleoli are absent. Lymphoma cells are dyscohesive and do "
            "not mould; "
        "they sit on lymphoglandular bodies.",
        "Nuclear moulding and salt-and-pepper chromatin favour small cell carcinoma over lymphoma.")),
    dict(id="g18", task="reasoning", subfield="ihc", gold="mismatch repair deficiency", response=single(
        "What does the loss of staining in the tumour mean for the patient?",
        "The tumour nuclei are negative for MLH1 and PMS2 while the stromal cells and lymphocytes are positive, an "
        "intact internal control. Loss of MLH1 with PMS2 means mismatch repair deficiency; the next step is MLH1 "
        "promoter methylation or BRAF testing to separate sporadic cases from Lynch syndrome.",
        "Mismatch repair deficiency (MLH1/PMS2 loss): test BRAF or MLH1 methylation, then consider Lynch syndrome.")),
    dict(id="g19", task="reasoning", subfield="fish", gold="MYC rearrangement", response=single(
        "What does the break-apart result imply in this large B-cell lymphoma?",
        "A split signal pattern for the MYC probe is seen in most nuclei. MYC rearrangement in a large B-cell lymphoma "
        "prompts testing for BCL2 and BCL6 rearrangements, since a double-hit lymphoma behaves aggressively.",
        "MYC rearrangement; BCL2 and BCL6 FISH should follow to exclude a double-hit lymphoma.")),
    dict(id="g20", task="reasoning", subfield="histopathology", gold="coagulative necrosis", response=single(
        "What process explains the pale area and why?",
        "The pale eosinophilic area keeps ghost outlines of cells without nuclei, and scattered nuclear debris is "
        "present. Preserved outlines with lost nuclei indicate coagulation of proteins after ischaemia.",
        "Coagulative necrosis after ischaemic injury.")),
    dict(id="g21", task="conversation", subfield="histopathology", gold="adenocarcinoma", response=turns(
        ("What is the architecture at low power?", "Look at the arrangement of the epithelium.",
         "The epithelium forms back-to-back, irregular glands."),
        ("What do the nuclei look like?", "Check size, stratification and nucleoli.",
         "They are enlarged, crowded and stratified, with nucleoli."),
        ("So what is the diagnosis?", "Irregular invasive glands with atypical nuclei and desmoplasia mean carcinoma.",
         "This is an invasive adenocarcinoma.")), reasoning=None),
    dict(id="g22", task="conversation", subfield="cytology", gold="reactive mesothelial cells", response=turns(
        ("Are these cells benign?", "Compare them with the background mesothelium.",
         "They resemble the background cells with windows between them."),
        ("What is the final interpretation?", "Windows, a single population and a smooth spectrum favour reactive "
         "change.", "Reactive mesothelial cells, with no malignant population.")), reasoning=None),
    dict(id="g23", task="conversation", subfield="gross", gold="colonic adenocarcinoma", response=turns(
        ("Where is the lesion?", "Orient the segment by the mesentery.", "In the sigmoid colon, 12 cm from the "
         "distal margin."),
        ("How does it look?", "Describe shape and surface.", "An ulcerated, circumferential mass with raised rolled "
         "edges."),
        ("Does it reach the serosa?", "Look at the cut surface beneath the ulcer.", "It extends into the pericolic "
         "fat but not through the serosa."),
        ("What is the likely diagnosis?", "An annular ulcerated mass with rolled edges in an adult colon is "
         "carcinoma until proven otherwise.", "A colonic adenocarcinoma.")), reasoning=None),
    dict(id="g24", task="conversation", subfield="ihc", gold="melanoma", response=turns(
        ("Which cells are stained?", "Look at the tumour cells and the background.",
         "The large epithelioid tumour cells show strong nuclear and cytoplasmic SOX10 and S100."),
        ("What does that mean?", "Keratin is negative and the melanocytic markers are positive.",
         "The tumour is a melanoma.")), reasoning=None),
    dict(id="g25", task="conversation", subfield="fish", gold="1p/19q codeletion", response=turns(
        ("How many signals per nucleus?", "Count target and control probes.", "One target and two control signals "
         "for both 1p and 19q."),
        ("Interpretation?", "Loss of one copy of both arms relative to control is a codeletion.",
         "1p/19q codeletion, supporting an oligodendroglioma.")), reasoning=None),
    dict(id="g26", task="reasoning", subfield="histopathology", gold="lymphocytic infiltrate", response=(
        "<question>What population dominates this field?</question>\n<answer>A dense lymphocytic infiltrate.</answer>"),
        reasoning="Sheets of small, dark, round nuclei with scant cytoplasm fill the field; there is no gland, nest "
        "or spindle-cell pattern, so the population is lymphoid rather than epithelial."),
    dict(id="g27", task="mcq", subfield="gross", gold="D", response=(
        "<question>What is the most likely diagnosis for this ovarian mass?</question>\n"
        + OPT4.format(a="Serous cystadenoma", b="Mucinous cystadenoma", c="Endometrioma", d="Mature cystic teratoma")
        + "\n<answer>D</answer>"),
        reasoning="The cyst is filled with sebaceous material and hair, with a Rokitansky protuberance; that is a "
        "mature cystic teratoma."),
    dict(id="g28", task="description", subfield="histopathology", gold="Barrett oesophagus", response=single(
        "Describe the oesophageal biopsy.",
        "Assess the epithelium type, the presence of goblet cells and dysplasia.",
        "Columnar mucosa with well-formed goblet cells replaces the squamous lining, and the nuclei are basal without "
        "atypia. This is Barrett oesophagus without dysplasia. Measured at 5 um sections with alpha-smooth muscle in "
        "the muscularis.")),
    dict(id="g29", task="reasoning", subfield="ihc", gold="HER2 3+", response=single(
        "How should this HER2 stain be scored?",
        "Complete, intense, circumferential membrane staining is present in well over 10% of the invasive "
            "tumour cells. "
        "Incomplete or weak staining would be 1+ or 2+.",
        "HER2 3+ (positive).")),
    dict(id="g30", task="description", subfield="cytology", gold="squamous cell carcinoma", response=single(
        "Describe the smear.",
        "Note the background, the shapes of the cells and their cytoplasm and nuclei.",
        "Against a necrotic background lie pleomorphic cells, some tadpole-shaped, with dense orangeophilic "
        "cytoplasm and hyperchromatic, irregular nuclei: keratinising squamous cell carcinoma.")),
    dict(id="g31", task="mcq", subfield="histopathology", gold="Seborrhoeic keratosis", response=mcq(
        "A pigmented skin lesion is shown. Which diagnosis fits best?",
        ["Seborrhoeic keratosis", "Melanoma in situ", "Basal cell carcinoma"],
        "The lesion is exophytic with basaloid cells, horn cysts and a flat base above the adjacent epidermis; there "
        "is no peripheral palisading and no atypical melanocytes.", "A")),
    dict(id="g32", task="conversation", subfield="histopathology", gold="benign fibrous stroma", response=turns(
        ("What do you see?", "Describe fibres and cells.", "Wavy pink collagen with a few elongated nuclei."),
        ("Is there anything malignant?", "Look for atypia, mitoses and glands.",
         "No, it is benign fibrous stroma without atypia.")), reasoning=None),
]

_LOOP = "The nuclei are enlarged and hyperchromatic. "
_REP = "the glands are crowded and the nuclei are large "

BAD = [
    # repetition: sentence loops and n-gram loops, as degenerate sampling produces them
    dict(id="b01", task="reasoning", subfield="histopathology", gold="adenocarcinoma", expect="repetition",
         response=single("What is the diagnosis?", "Glands are irregular. " + _LOOP * 6, "Adenocarcinoma.")),
    dict(id="b02", task="description", subfield="cytology", gold="adenocarcinoma", expect="repetition",
         response=single("Describe the fluid.", "Look at the clusters. " + _REP * 10 + "so adenocarcinoma.",
                         "Metastatic adenocarcinoma.")),
    dict(id="b03", task="mcq", subfield="ihc", gold="A", expect="repetition", response=mcq(
        "Which marker is shown?", ["CK7", "CK20", "CDX2", "TTF-1"],
        "Membranous and cytoplasmic staining. Membranous and cytoplasmic staining. Membranous and cytoplasmic "
            "staining. "
        "Membranous and cytoplasmic staining. So CK7.", "A")),
    dict(id="b04", task="conversation", subfield="gross", gold="leiomyoma", expect="repetition", response=turns(
        ("What is it?", "It is a whorled mass. It is a whorled mass. It is a whorled mass. It is a whorled mass.",
         "A leiomyoma."),
        ("Anything else?", "No necrosis.", "It is a leiomyoma."))),
    dict(id="b05", task="reasoning", subfield="fish", gold="HER2 amplification", expect="repetition",
         response=single("Interpret the FISH.", "red signals red signals red signals red signals red signals red "
                         "signals red signals red signals red signals red signals red signals red signals red signals "
                         "red signals red signals red signals", "HER2 amplification.")),
    dict(id="b06", task="description", subfield="histopathology", gold="chronic gastritis", expect="repetition",
         response=single("Describe.", "Check the mucosa.",
                         "Plasma cells in the lamina propria. Plasma cells in the lamina propria. Plasma cells in the "
                         "lamina propria. Plasma cells in the lamina propria. Chronic gastritis.")),
    # language mixing: CJK, Cyrillic, Hangul inside English pathology text
    dict(id="b07", task="mcq", subfield="histopathology", gold="Tubular adenoma", expect="language_mix", response=mcq(
        "Which diagnosis fits this polyp?", ["Tubular adenoma", "Hyperplastic polyp", "Adenocarcinoma", "Lipoma"],
        "The crypts show 腺瘤 features with pencillate nuclei and no invasion.", "A")),
    dict(id="b08", task="description", subfield="cytology", gold="papillary thyroid carcinoma", expect="language_mix",
         response=single("Describe the aspirate.", "Nuclear grooves and 核内包涵体 are seen.",
                         "Papillary thyroid carcinoma with nuclear grooves.")),
    dict(id="b09", task="reasoning", subfield="ihc", gold="melanoma", expect="language_mix",
         response=single("What is it?", "SOX10 positive, keratin negative, so меланома is favoured.",
                         "It is a melanoma.")),
    dict(id="b10", task="reasoning", subfield="histopathology", gold="squamous cell carcinoma", expect="language_mix",
         response=single("What is the diagnosis?", "Keratin pearls and intercellular bridges indicate squamous "
                         "differentiation.", "편평세포암 (squamous cell carcinoma).")),
    dict(id="b11", task="conversation", subfield="gross", gold="infarct", expect="language_mix", response=turns(
        ("Shape?", "Wedge with base on the capsule.", "Wedge-shaped."),
        ("Diagnosis?", "An end-artery territory: 梗死.", "A splenic infarct."))),
    dict(id="b12", task="description", subfield="fish", gold="ALK rearrangement", expect="language_mix",
         response=single("Describe.", "Split signals in many nuclei，over the cut-off.", "ALK rearrangement.")),
    # tags: broken, nested, duplicated, missing, stray text
    dict(id="b13", task="reasoning", subfield="histopathology", gold="granuloma", expect="tags",
         response="<question>What is the structure?</question>\n<think>Epithelioid histiocytes and a giant cell.\n"
                  "<answer>A granuloma.</answer>"),
    dict(id="b14", task="reasoning", subfield="cytology", gold="small cell carcinoma", expect="tags",
         response="<question>What is it?</question><think>Moulding.</think><think>Crush artefact.</think>"
                  "<answer>Small cell carcinoma.</answer>"),
    dict(id="b15", task="description", subfield="gross", gold="renal cell carcinoma", expect="tags",
         response="Sure! Here is the sample:\n" + single("Describe it.", "Golden yellow mass.",
                                                         "Renal cell carcinoma, a golden yellow mass.")),
    dict(id="b16", task="mcq", subfield="ihc", gold="C", expect="tags",
         response="<question>Which marker?</question>\n<think>Nuclear staining <answer>inside</answer> of tumour."
                  "</think>\n<answer>C</answer>"),
    dict(id="b17", task="reasoning", subfield="histopathology", gold="adipose tissue", expect="tags",
         response="<think>Vacuoles and septa.</think><answer>Adipose tissue.</answer>"),
    dict(id="b18", task="mcq", subfield="histopathology", gold="B", expect="tags",
         response="<question>Which tissue?</question>\n<think>Gland-like rings.</think>\n<answer>B</answer>"),
    dict(id="b19", task="description", subfield="histopathology", gold="coagulative necrosis", expect="tags",
         response=single("Describe.", "Ghost cells.", "Coagulative necrosis.") + "\n\nI hope this helps!"),
    dict(id="b20", task="conversation", subfield="ihc", gold="melanoma", expect="tags",
         response=single("Which cells stain?", "SOX10 in tumour cells, keratin negative, so a melanocytic tumour.",
                         "The tumour cells; this is a melanoma.")),
    # truncation: cut off by max_tokens
    dict(id="b21", task="reasoning", subfield="histopathology", gold="adenocarcinoma", expect="truncation",
         finish_reason="length", response="<question>What is the diagnosis?</question>\n<think>The glands are "
         "irregular and back-to-back, the nuclei are stratified and"),
    dict(id="b22", task="description", subfield="gross", gold="leiomyoma", expect="truncation", finish_reason="length",
         response=single("Describe.", "Whorled white surface, circumscribed.", "A circumscribed whorled leiomyoma")
         .removesuffix("</answer>")),
    dict(id="b23", task="mcq", subfield="cytology", gold="A", expect="truncation", finish_reason="length",
         response="<question>What is the diagnosis?</question>\n<options>\nA. Reactive\nB. Malignant\n"),
    dict(id="b24", task="reasoning", subfield="fish", gold="MYC rearrangement", expect="truncation",
         finish_reason="length", response=single("Interpret the result.", "Split signals in most nuclei, so MYC is "
                                                 "rearranged; BCL2 and BCL6 should be tested.", "MYC rearrangement.")),
    # answer consistency: wrong letter, impossible letter, not a letter, answer missing the diagnosis
    dict(id="b25", task="mcq", subfield="histopathology", gold="Tubular adenoma", expect="answer_consistency",
         response=mcq("Which diagnosis fits?", ["Hyperplastic polyp", "Tubular adenoma", "Adenocarcinoma", "Lipoma"],
                      "Pencillate hyperchromatic nuclei in elongated crypts without invasion indicate an adenoma.",
                      "C")),
    dict(id="b26", task="mcq", subfield="ihc", gold="B", expect="answer_consistency", response=mcq(
        "Which stain marks proliferation?", ["CD20", "Ki-67", "BCL2", "CD3"],
        "Ki-67 marks cycling nuclei; it is the proliferation stain.", "E")),
    dict(id="b27", task="mcq", subfield="cytology", gold="Papillary thyroid carcinoma", expect="answer_consistency",
         response=mcq("What is the diagnosis?", ["Goitre", "Papillary thyroid carcinoma", "Follicular adenoma",
                                                 "Thyroiditis"],
                      "Grooves and pseudoinclusions define papillary carcinoma.", "Papillary thyroid carcinoma")),
    dict(id="b28", task="description", subfield="gross", gold="renal cell carcinoma", expect="answer_consistency",
         response=single("Describe the specimen.", "Assess the mass and its colour.",
                         "A 6 cm well-circumscribed mass with a variegated yellow cut surface at the upper pole.")),
    dict(id="b29", task="reasoning", subfield="histopathology", gold="Hashimoto thyroiditis",
         expect="answer_consistency", response=single(
             "What is the diagnosis?", "Lymphoid follicles with germinal centres surround atrophic follicles.",
             "A reactive lymphoid process of the thyroid, most likely Graves disease.")),
    dict(id="b30", task="mcq", subfield="fish", gold="A", expect="answer_consistency", response=mcq(
        "What does the signal pattern show?", ["Amplification", "Polysomy", "Normal", "Deletion"],
        "Clusters of red signals well above the green: amplification. But the ratio is borderline, so polysomy.",
        "B")),
    # near-duplicate: a copy of a good output with one word changed; the filter takes rows in id order, so these ids
    # sort after the originals (g01, g09) and the copies are the ones dropped
    dict(id="n31", task="mcq", subfield="histopathology", gold="Tubular adenoma", expect="near_duplicate",
         response=mcq("A polypoid colonic lesion is shown at low power. Which diagnosis fits best?",
                      ["Hyperplastic polyp", "Tubular adenoma", "Invasive adenocarcinoma", "Juvenile polyp"],
                      "The crypts are elongated and lined by pencillate, hyperchromatic nuclei that reach the surface, "
                      "and there is no serration. The lamina propria is intact and no desmoplastic stroma is seen, so "
                      "invasion is not shown.", "B")),
    dict(id="n32", task="description", subfield="histopathology", gold="chronic gastritis", expect="near_duplicate",
         response=single("Please describe this biopsy.",
                         "Start with the mucosa and glands, then the lamina propria infiltrate, then look for "
                         "organisms and intestinal metaplasia.",
                         "The antral mucosa shows preserved foveolar architecture. The lamina propria is expanded by "
                         "plasma cells and lymphocytes with a lymphoid follicle. No neutrophils, metaplasia or "
                         "dysplasia are seen. The appearance is that of chronic gastritis.")),
    # length: too short to teach anything
    dict(id="b33", task="reasoning", subfield="histopathology", gold="necrosis", expect="length",
         response="<question>What?</question><think>Pale.</think><answer>Necrosis.</answer>"),
    dict(id="b34", task="description", subfield="cytology", gold=None, expect="length",
         response="<question>Describe.</question><think>Cells.</think><answer>Benign.</answer>"),
]

CASES = [{**c, "expect": None} for c in GOOD] + BAD
