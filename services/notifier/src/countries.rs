//! English short names of ISO 3166-1 alpha-2 regions, for plain-language
//! warnings ("East Timor (+670 77)").

/// `code name` pairs, sorted by code.
#[rustfmt::skip]
const NAMES: &[(&str, &str)] = &[
    ("AD", "Andorra"), ("AE", "the United Arab Emirates"), ("AF", "Afghanistan"),
    ("AG", "Antigua and Barbuda"), ("AI", "Anguilla"), ("AL", "Albania"), ("AM", "Armenia"),
    ("AO", "Angola"), ("AR", "Argentina"), ("AS", "American Samoa"), ("AT", "Austria"),
    ("AU", "Australia"), ("AW", "Aruba"), ("AZ", "Azerbaijan"),
    ("BA", "Bosnia and Herzegovina"), ("BB", "Barbados"), ("BD", "Bangladesh"),
    ("BE", "Belgium"), ("BF", "Burkina Faso"), ("BG", "Bulgaria"), ("BH", "Bahrain"),
    ("BI", "Burundi"), ("BJ", "Benin"), ("BM", "Bermuda"), ("BN", "Brunei"), ("BO", "Bolivia"),
    ("BQ", "the Caribbean Netherlands"), ("BR", "Brazil"), ("BS", "the Bahamas"),
    ("BT", "Bhutan"), ("BW", "Botswana"), ("BY", "Belarus"), ("BZ", "Belize"),
    ("CA", "Canada"), ("CD", "the DR Congo"), ("CF", "the Central African Republic"),
    ("CG", "the Republic of the Congo"), ("CH", "Switzerland"), ("CI", "Côte d'Ivoire"),
    ("CK", "the Cook Islands"), ("CL", "Chile"), ("CM", "Cameroon"), ("CN", "China"),
    ("CO", "Colombia"), ("CR", "Costa Rica"), ("CU", "Cuba"), ("CV", "Cape Verde"),
    ("CW", "Curaçao"), ("CY", "Cyprus"), ("CZ", "Czechia"), ("DE", "Germany"),
    ("DJ", "Djibouti"), ("DK", "Denmark"), ("DM", "Dominica"),
    ("DO", "the Dominican Republic"), ("DZ", "Algeria"), ("EC", "Ecuador"), ("EE", "Estonia"),
    ("EG", "Egypt"), ("ER", "Eritrea"), ("ES", "Spain"), ("ET", "Ethiopia"), ("FI", "Finland"),
    ("FJ", "Fiji"), ("FK", "the Falkland Islands"), ("FM", "Micronesia"),
    ("FO", "the Faroe Islands"), ("FR", "France"), ("GA", "Gabon"),
    ("GB", "the United Kingdom"), ("GD", "Grenada"), ("GE", "Georgia"),
    ("GF", "French Guiana"), ("GH", "Ghana"), ("GI", "Gibraltar"), ("GL", "Greenland"),
    ("GM", "the Gambia"), ("GN", "Guinea"), ("GP", "Guadeloupe"), ("GQ", "Equatorial Guinea"),
    ("GR", "Greece"), ("GT", "Guatemala"), ("GU", "Guam"), ("GW", "Guinea-Bissau"),
    ("GY", "Guyana"), ("HK", "Hong Kong"), ("HN", "Honduras"), ("HR", "Croatia"),
    ("HT", "Haiti"), ("HU", "Hungary"), ("ID", "Indonesia"), ("IE", "Ireland"),
    ("IL", "Israel"), ("IN", "India"), ("IQ", "Iraq"), ("IR", "Iran"), ("IS", "Iceland"),
    ("IT", "Italy"), ("JM", "Jamaica"), ("JO", "Jordan"), ("JP", "Japan"), ("KE", "Kenya"),
    ("KG", "Kyrgyzstan"), ("KH", "Cambodia"), ("KI", "Kiribati"), ("KM", "the Comoros"),
    ("KN", "Saint Kitts and Nevis"), ("KP", "North Korea"), ("KR", "South Korea"),
    ("KW", "Kuwait"), ("KY", "the Cayman Islands"), ("KZ", "Kazakhstan"), ("LA", "Laos"),
    ("LB", "Lebanon"), ("LC", "Saint Lucia"), ("LI", "Liechtenstein"), ("LK", "Sri Lanka"),
    ("LR", "Liberia"), ("LS", "Lesotho"), ("LT", "Lithuania"), ("LU", "Luxembourg"),
    ("LV", "Latvia"), ("LY", "Libya"), ("MA", "Morocco"), ("MC", "Monaco"), ("MD", "Moldova"),
    ("ME", "Montenegro"), ("MG", "Madagascar"), ("MH", "the Marshall Islands"),
    ("MK", "North Macedonia"), ("ML", "Mali"), ("MM", "Myanmar"), ("MN", "Mongolia"),
    ("MO", "Macao"), ("MP", "the Northern Mariana Islands"), ("MQ", "Martinique"),
    ("MR", "Mauritania"), ("MS", "Montserrat"), ("MT", "Malta"), ("MU", "Mauritius"),
    ("MV", "the Maldives"), ("MW", "Malawi"), ("MX", "Mexico"), ("MY", "Malaysia"),
    ("MZ", "Mozambique"), ("NA", "Namibia"), ("NC", "New Caledonia"), ("NE", "Niger"),
    ("NF", "Norfolk Island"), ("NG", "Nigeria"), ("NI", "Nicaragua"),
    ("NL", "the Netherlands"), ("NO", "Norway"), ("NP", "Nepal"), ("NR", "Nauru"),
    ("NU", "Niue"), ("NZ", "New Zealand"), ("OM", "Oman"), ("PA", "Panama"), ("PE", "Peru"),
    ("PF", "French Polynesia"), ("PG", "Papua New Guinea"), ("PH", "the Philippines"),
    ("PK", "Pakistan"), ("PL", "Poland"), ("PM", "Saint Pierre and Miquelon"),
    ("PR", "Puerto Rico"), ("PS", "Palestine"), ("PT", "Portugal"), ("PW", "Palau"),
    ("PY", "Paraguay"), ("QA", "Qatar"), ("RE", "Réunion"), ("RO", "Romania"),
    ("RS", "Serbia"), ("RU", "Russia"), ("RW", "Rwanda"), ("SA", "Saudi Arabia"),
    ("SB", "the Solomon Islands"), ("SC", "Seychelles"), ("SD", "Sudan"), ("SE", "Sweden"),
    ("SG", "Singapore"), ("SH", "Saint Helena"), ("SI", "Slovenia"), ("SK", "Slovakia"),
    ("SL", "Sierra Leone"), ("SM", "San Marino"), ("SN", "Senegal"), ("SO", "Somalia"),
    ("SR", "Suriname"), ("SS", "South Sudan"), ("ST", "São Tomé and Príncipe"),
    ("SV", "El Salvador"), ("SX", "Sint Maarten"), ("SY", "Syria"), ("SZ", "Eswatini"),
    ("TC", "the Turks and Caicos Islands"), ("TD", "Chad"), ("TG", "Togo"),
    ("TH", "Thailand"), ("TJ", "Tajikistan"), ("TK", "Tokelau"), ("TL", "East Timor"),
    ("TM", "Turkmenistan"), ("TN", "Tunisia"), ("TO", "Tonga"), ("TR", "Turkey"),
    ("TT", "Trinidad and Tobago"), ("TV", "Tuvalu"), ("TW", "Taiwan"), ("TZ", "Tanzania"),
    ("UA", "Ukraine"), ("UG", "Uganda"), ("US", "the United States"), ("UY", "Uruguay"),
    ("UZ", "Uzbekistan"), ("VA", "Vatican City"),
    ("VC", "Saint Vincent and the Grenadines"), ("VE", "Venezuela"),
    ("VG", "the British Virgin Islands"), ("VI", "the US Virgin Islands"), ("VN", "Vietnam"),
    ("VU", "Vanuatu"), ("WF", "Wallis and Futuna"), ("WS", "Samoa"), ("XK", "Kosovo"),
    ("YE", "Yemen"), ("YT", "Mayotte"), ("ZA", "South Africa"), ("ZM", "Zambia"),
    ("ZW", "Zimbabwe"),
];

/// The English name of region `code` (`"TL"` → `"East Timor"`).
pub fn country_name(code: &str) -> Option<&'static str> {
    let code = code.to_ascii_uppercase();
    NAMES
        .binary_search_by(|(c, _)| c.cmp(&code.as_str()))
        .ok()
        .map(|i| NAMES[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_and_found() {
        assert!(NAMES.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(country_name("TL"), Some("East Timor"));
        assert_eq!(country_name("nl"), Some("the Netherlands"));
        assert_eq!(country_name("001"), None);
    }
}
